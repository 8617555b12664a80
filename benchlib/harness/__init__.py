"""The measurement harness: timing, statistics, verification, environment and the runner."""
