"""The one base class of errors a user causes and can fix (bad file, unknown run, wrong flag...).

Every stage raises a subclass whose message says what was wrong, where (file, row, line, field)
and what to do; the command line prints that message without a traceback and exits with 2.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on; its message is meant to be shown as it is."""
