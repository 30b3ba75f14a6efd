"""Errors shared by the command-line tools."""


class UserError(Exception):
    """A problem the person running the command can fix; shown as one line, exit 2."""
