"""Built-in benchlib targets: one module per backend, registered through entry points."""
