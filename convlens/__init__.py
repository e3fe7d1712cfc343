"""The `convlens` command line: serve, worker, train, submit, watch, export, data."""
