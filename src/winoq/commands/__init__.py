"""The ``winoq`` commands, one module each (``register(subparsers)`` adds its subparser)."""
