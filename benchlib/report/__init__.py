"""Renderers: pure functions from results to rich renderables (``console``), Markdown
(``markdown``: ``write_report(run_dir)`` rewrites a run folder's report.md and plots) and PNG
plots (``plots``, matplotlib imported lazily)."""
