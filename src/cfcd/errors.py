"""User-facing errors.

Raise :class:`CfcdError` for an expected mistake (bad file, wrong shape, missing image):
the command line prints its message, without a traceback, and exits with status 2.
The message names the file and what is wrong with it.
"""


class CfcdError(Exception):
    """An expected, user-facing error: the message alone says what is wrong and where."""


class InputError(CfcdError, ValueError):
    """A file or argument given by the user is missing, malformed or inconsistent."""
