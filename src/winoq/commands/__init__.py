"""Subcommands of the ``winoq`` command line, one module each."""
