"""The one exception type for mistakes a user can fix (bad paths, bad values)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one sentence without a traceback.

    The message names the input and says how to fix it. Entry points catch it, print it and exit
    non-zero; everything else is a bug and is allowed to raise.
    """
