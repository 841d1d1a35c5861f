"""Text that goes into reasons, logs and reports."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """`exc` as one line: its type and message, every line of it kept (pydicom lists what
    each decoder plugin said on lines of their own, after a first line ending in ':')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return f"{type(exc).__name__}: {text}"
