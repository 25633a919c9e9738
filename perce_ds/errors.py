"""What counts as a user's error: input the user can fix (a config key or type, a missing file, a bad record,
a dataset that does not fit). The entry points print such an error as its one-line message and exit non-zero;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by the user's input; its message says what is wrong and what to do."""


class InputFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class DataSourceError(UserError, ValueError):
    """A dataset, config, split, file format or schema that cannot be used; the message names which and what
    was found."""
