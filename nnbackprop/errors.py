"""How nnbackprop words an error for a person: one line, beginning with :data:`ERROR_PREFIX`."""

from __future__ import annotations

from typing import Any

ERROR_PREFIX = "nnbackprop: error: "
"""How every error line of the command line and the scripts begins."""


def one_line(message: Any) -> str:
    """A multi-line message joined into one line (a line ending in ``:`` introduces the next ones)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for previous, line in zip(lines, lines[1:]):
        text += (" " if previous.endswith(":") else "; ") + line
    return text


def gist(error: BaseException) -> str:
    """``Type: first line`` of an error raised by code we do not control (torch, a user's file), without a final
    full stop."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].rstrip('.')}" if text else type(error).__name__
