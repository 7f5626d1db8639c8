"""Mistakes a user can fix: reported as one line naming the problem and the fix, never a traceback."""


class UserError(Exception):
    """Bad input (unknown name, missing or corrupt file, impossible setting)."""


class DataError(UserError):
    """A data file is missing or is not in the expected format."""
