"""Errors the CLI reports as one line, without a traceback."""


class UserError(Exception):
    """An error caused by the user's input (a bad file, a missing weight, a wrong option)."""
