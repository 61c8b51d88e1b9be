class UsageError(ValueError):
    """A problem with the user's arguments or files: the CLI reports it in one line, without a traceback."""
