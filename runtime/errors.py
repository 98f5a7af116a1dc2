"""The one base class of user errors.

A `ScanError` is a problem with what the user passed (a file, a flag, a bundle), not a bug:
the CLI prints its message as one line and exits with status 2. Everything else propagates
with its traceback, so bugs are never disguised as bad input.
"""

from __future__ import annotations


class ScanError(Exception):
    """A user error; the message names the problem and the fix, on one line."""


class BundleError(ScanError):
    """A bundle that cannot be used or written; the message says what to do."""
