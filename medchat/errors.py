"""The one base class of errors a user causes and can fix (bad file, unknown run, wrong flag...),
and `without_local_paths` for messages shown to someone other than the operator.

Every stage raises a subclass whose message says what was wrong, where (file, row, line, field)
and what to do; the command line prints that message without a traceback and exits with 2. The
app and its /v1 API show a visitor the same messages with this machine's paths cut to their last
part: the visitor needs to know which file, not where the server keeps it.
"""

from __future__ import annotations

import os
import re

# an absolute path (two parts at least) or a home-relative one; not part of a URL ("http://h/x"),
# a relative path ("runs/x") or a word
_PATH = re.compile(r"(?<![\w.~:/\\\-])(?:~|/[\w.@+\-]+)(?:/[\w.@+\-]+)+/?")


class UserError(Exception):
    """An error the user can act on; its message is meant to be shown as it is."""


def without_local_paths(text: str) -> str:
    """`text` with each path of this machine (~/..., or an absolute path under a folder that
    exists at / here) cut to its last part; other slashes ('GET /v1/models', 'mg/kg') stay."""

    def cut(m: re.Match) -> str:
        path = m.group(0)
        local = path.startswith("~") or os.path.isdir("/" + path.split("/")[1])
        return os.path.basename(path.rstrip("/")) if local else path

    return _PATH.sub(cut, text)
