"""The command line: the only place that turns DispoError into an exit code."""
