"""Finding the solution in a model's reply: the last fenced code block.

Reasoning in ``<think>...</think>`` is dropped first. A reply cut off inside its last block (no closing
fence) still yields that block's text, so a truncated solution is evaluated and its error shown.
"""

from __future__ import annotations

import re

__all__ = ["extract_code"]

_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)
_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$", re.M)


def extract_code(text: str) -> str | None:
    """The last fenced code block of ``text`` (any language tag), or ``None`` when there is none."""
    text = _THINK.sub("", text)
    fences = list(_FENCE.finditer(text))
    blocks: list[str] = []
    i = 0
    while i < len(fences):
        start = fences[i].end() + 1
        if i + 1 < len(fences):
            blocks.append(text[start:fences[i + 1].start()])
            i += 2
        else:
            blocks.append(text[start:])  # unclosed: the reply was cut inside the block
            i += 1
    code = blocks[-1].strip("\n") if blocks else ""
    return code if code.strip() else None
