"""Server paths never reach a client: messages name models and repository-relative paths.

The repository's errors (a model that failed to load, a file it could not read) name
absolute paths, which the server log keeps for its operator. What a client reads (status
messages, ``ListModels.failures``) goes through :func:`client_text`: a path under the
repository root becomes relative to it (``/srv/models/broken/model.onnx`` ->
``broken/model.onnx``), the root itself ``<models>``, and any other absolute path its
last component (``.../libfoo.so``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT_WORD = "<models>"
# An absolute path of two or more components, not inside a URL ("https://a/b") or a
# relative path ("a/b/c"): "/" after neither a word character nor one of "./:~-".
_ABSOLUTE = re.compile(r"(?<![\w./:~-])/(?:[\w.@+,=-]+/)+([\w.@+,=-]+)?")


def root_spellings(root: str | os.PathLike | None) -> tuple[str, ...]:
    """The absolute ways a message may spell ``root`` (as given when absolute, made
    absolute, resolved), longest first so a longer spelling is replaced before a shorter."""
    if root is None:
        return ()
    path = Path(root)
    spellings = {str(path.absolute())}
    try:
        spellings.add(str(path.resolve()))
    except (OSError, RuntimeError):  # a symlink loop: the other spelling remains
        pass
    spellings = {s.rstrip(os.sep) for s in spellings}
    return tuple(sorted((s for s in spellings if s), key=len, reverse=True))


def client_text(message: str, root: str | os.PathLike | None) -> str:
    """``message`` without absolute server paths (see the module docstring)."""
    for spelling in root_spellings(root):
        # under the root: its relative path; the root itself ("/srv/models", ".../models/"):
        # the word; a longer name ("/srv/models2"): left to _ABSOLUTE
        pattern = re.compile(
            rf"(?<![\w./~-]){re.escape(spelling)}(?:(/)(?=[\w.@+,=-])|/?(?![\w.@+,=-]))"
        )
        message = pattern.sub(lambda match: "" if match.group(1) else ROOT_WORD, message)
    return _ABSOLUTE.sub(lambda match: ".../" + (match.group(1) or ""), message)
