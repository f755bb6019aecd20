"""Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``: tests on machines without a GPU).

The engine's kernels adjust to the interpreter's arithmetic there, and the runner lets them run on CPU only then.
Imports no triton.
"""

from __future__ import annotations

import os

__all__ = ["interpreted"]


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
