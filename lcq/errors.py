"""Errors caused by what a person asked for; the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input: a missing folder, an unsupported option, an empty file."""
