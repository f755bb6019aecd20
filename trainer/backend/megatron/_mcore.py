"""The one place that imports megatron-core.

Without Transformer Engine or Apex, megatron-core warns at import time that it falls back to its local
implementations; that is this backend's intended configuration, so those import warnings are silenced here
(and only here). :data:`MCORE_ERROR` holds why the import failed when megatron-core is not installed.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["MCORE_ERROR", "PackedSeqParams", "require"]

MCORE_ERROR: str | None = None


class _NoPackedSeqParams:
    """Stand-in so the pure parts of this package import without megatron-core."""


PackedSeqParams: Any = _NoPackedSeqParams
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core
        import megatron.core.optimizer
        import megatron.core.pipeline_parallel  # noqa: F401
        from megatron.core.packed_seq_params import PackedSeqParams as _Packed
    PackedSeqParams = _Packed
except ImportError as exc:  # the megatron extra is not installed
    MCORE_ERROR = f"megatron-core is not installed ({exc}); pip install 'agentrl[megatron]'"


def require() -> None:
    """Raise ConfigError when megatron-core cannot be imported."""
    if MCORE_ERROR is not None:
        from agentrl.errors import ConfigError

        raise ConfigError(f"config key learner.backend: megatron: {MCORE_ERROR}")
