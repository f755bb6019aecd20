"""Evaluate one solution against one reference in a fresh sandboxed subprocess.

:func:`evaluate_solution` sends :mod:`envs.kernelgen.harness` to :func:`envs.sandbox.run_python`, reads
back the harness's tagged result line and turns every way the run can end (result, crash, timeout,
limits) into an :class:`EvalResult` with an ``outcome``:

=================  =========  ========  ==================================================================
outcome            compiled   correct   meaning
=================  =========  ========  ==================================================================
``no_code``        no         no        the reply had no code block
``error``          no         no        import, construction or the first forward raised (compile errors)
``crash``          no / yes   no        the process died (signal): out-of-bounds access, abort
``timeout``        no / yes   no        the wall-clock or CPU limit stopped it
``violation``      yes        no        an anti-hacking rule caught it (``violations`` says which)
``wrong``          yes        no        it ran but an output differs from the reference
``correct``        yes        yes       every input set matched (``timing`` set on CUDA)
=================  =========  ========  ==================================================================

A failure of the harness itself, the reference or the device (``harness_error``) raises
:class:`~agentrl.errors.EnvCrashed`: it is not the policy's outcome.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agentrl.errors import EnvCrashed
from envs.kernelgen import harness
from envs.sandbox import SandboxLimits, SandboxResult, run_python
from envs.sandbox_cgroup import cgroup_root

__all__ = ["EvalConfig", "EvalResult", "Outcome", "evaluate_solution"]

# torch + triton need more address space, threads and open files than plain Python; a result line fits 64 KiB
DEFAULT_LIMITS = SandboxLimits(wall_s=60.0, cpu_s=60, memory_mb=4096, max_processes=64, max_open_files=256,
                               max_output_bytes=65536)
Outcome = Literal["no_code", "error", "crash", "timeout", "violation", "wrong", "correct"]


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """How solutions are run: device, input sets, tolerances, timing, sandbox limits."""

    device: Literal["cpu", "cuda"] = "cpu"  # cpu runs kernels in Triton's interpreter (TRITON_INTERPRET=1)
    sets: int = 3  # fresh random input sets the solution must match
    atol: float = 1e-3  # defaults; a problem's KERNELGEN settings override them
    rtol: float = 1e-3
    timing: bool = True  # CUDA only: CUDA-event timing of solution, eager and torch.compile
    compile_baseline: bool = True
    warmup: int = 5
    reps: int = 30
    limits: SandboxLimits = field(default_factory=lambda: DEFAULT_LIMITS)


@dataclass(slots=True)
class EvalResult:
    """What one evaluation found; ``raw`` is the harness's own result (empty when the process died)."""

    outcome: Outcome
    compiled: bool = False
    correct: bool = False
    stage: str = ""
    error: str = ""
    violations: list[dict[str, str]] = field(default_factory=list)
    mismatch: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    sets: int = 0
    sets_passed: int = 0
    signal: str | None = None
    seconds: float = 0.0
    stderr_tail: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup_eager(self) -> float | None:
        return _ratio(self.timing, "eager_ms")

    @property
    def speedup_compile(self) -> float | None:
        return _ratio(self.timing, "compile_ms")

    @property
    def cheated(self) -> bool:
        return bool(self.violations)


def _ratio(timing: dict[str, Any] | None, baseline: str) -> float | None:
    if not timing or not timing.get(baseline) or not timing.get("solution_ms"):
        return None
    return float(timing[baseline]) / float(timing["solution_ms"])


@functools.cache
def _harness_source() -> str:
    return Path(harness.__file__).read_text()


def build_program(reference: str, solution: str, cfg: EvalConfig, settings: dict[str, Any], *, seed: int,
                  nonce: str) -> str:
    """The sandbox's ``main.py``: the harness plus a call with this evaluation's payload."""
    payload = {
        "reference": reference, "solution": solution, "device": cfg.device, "interpret": cfg.device == "cpu",
        "sets": cfg.sets, "atol": settings.get("atol", cfg.atol), "rtol": settings.get("rtol", cfg.rtol),
        "seed": seed, "timing": cfg.timing, "compile_baseline": cfg.compile_baseline, "warmup": cfg.warmup,
        "reps": cfg.reps, "nonce": nonce,
    }
    if "forbid" in settings:
        payload["forbid"] = list(settings["forbid"])
    return f"{_harness_source()}\n\nmain(json.loads({json.dumps(payload)!r}))\n"


def _environment(cfg: EvalConfig, gpu: str | None) -> dict[str, str]:
    """Thread counts of one core, caches inside the scratch dir, Triton's interpreter on CPU, one GPU on CUDA."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TRITON_CACHE_DIR": ".triton", "TORCHINDUCTOR_CACHE_DIR": ".inductor", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # the torch.compile baseline compiles in-process (task limit)
    if cfg.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _limits(cfg: EvalConfig) -> SandboxLimits:
    """On CUDA without a cgroup, memory falls back to a per-process address-space limit, which the CUDA driver's
    reservations (host plus device memory) exceed: lift it there (the wall-clock and CPU limits still hold)."""
    if cfg.device == "cuda" and cgroup_root() is None:
        return dataclasses.replace(cfg.limits, memory_mb=max(cfg.limits.memory_mb, 1 << 22))
    return cfg.limits


def _devices(cfg: EvalConfig) -> list[str]:
    """The NVIDIA device files a CUDA run needs (the GPU it uses is chosen by ``CUDA_VISIBLE_DEVICES``)."""
    return sorted(glob.glob("/dev/nvidia*")) if cfg.device == "cuda" else []


async def evaluate_solution(reference: str, solution: str | None, cfg: EvalConfig, *, settings: dict[str, Any] | None
                            = None, seed: int = 0, gpu: str | None = None) -> EvalResult:
    """Run ``solution`` against ``reference`` in a fresh sandbox; ``solution=None`` is a reply without code.

    ``gpu`` (CUDA mode) is the device the run may see, as ``CUDA_VISIBLE_DEVICES``."""
    if solution is None:
        return EvalResult(outcome="no_code", error="no code block found in the reply")
    nonce = secrets.token_hex(8)
    program = build_program(reference, solution, cfg, settings or {}, seed=seed, nonce=nonce)
    run = await run_python(program, limits=_limits(cfg), python=sys.executable, site_packages=True,
                           env=_environment(cfg, gpu), devices=_devices(cfg))
    return interpret(run, nonce, cfg)


def interpret(run: SandboxResult, nonce: str, cfg: EvalConfig) -> EvalResult:
    """Turn the sandbox's result into an :class:`EvalResult` (raises EnvCrashed for harness failures)."""
    stages, raw = _read_channel(run.stdout, nonce)
    stage = stages[-1] if stages else "start"
    base: dict[str, Any] = {"seconds": run.seconds, "stderr_tail": run.stderr[-2000:], "sets": cfg.sets}
    if raw is None:
        return _died(run, stage, base)
    if raw.get("harness_error"):
        raise EnvCrashed(f"kernel evaluation harness failed at stage {raw.get('stage')}: {raw.get('error', '')[-1500:]}")
    violations = list(raw.get("violations") or [])
    error = str(raw.get("error") or "")
    outcome: Outcome = ("violation" if violations else "correct" if raw.get("correct")
                        else "wrong" if raw.get("mismatch") else "crash" if device_fault(error) else "error")
    return EvalResult(outcome=outcome, compiled=bool(raw.get("compiled")), correct=outcome == "correct",
                      stage=str(raw.get("stage", stage)), error=error, violations=violations,
                      mismatch=raw.get("mismatch"), timing=raw.get("timing"), sets_passed=int(raw.get("sets_passed", 0)),
                      raw=raw, **base)


# CUDA's sticky errors: the solution's kernel faulted on the device and the context is lost. The process lives on
# to report them as a Python exception, but they are crashes as much as a segfault under the CPU interpreter is
# (the policy's, like any crash once the solution runs: the pool counts only faults before it).
_DEVICE_FAULTS = ("an illegal memory access was encountered", "misaligned address", "unspecified launch failure",
                  "an illegal instruction was encountered", "device-side assert triggered")


def device_fault(error: str) -> str | None:
    """The line of ``error`` that reports a CUDA device fault, if one does."""
    lines = [ln.strip() for ln in error.splitlines() if "CUDA" in ln]  # torch's "CUDA error: ...", Triton's "[CUDA]: ..."
    return next((ln for ln in lines if any(f in ln for f in _DEVICE_FAULTS)), None)


def _read_channel(stdout: str, nonce: str) -> tuple[list[str], dict[str, Any] | None]:
    stages: list[str] = []
    raw = None
    for line in stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] == nonce:
            if parts[0] == harness.STAGE_TAG:
                stages.append(parts[2].split(" ")[0])
            elif parts[0] == harness.RESULT_TAG:
                raw = json.loads(parts[2])
    return stages, raw


def _died(run: SandboxResult, stage: str, base: dict[str, Any]) -> EvalResult:
    """No verdict: the process was killed, crashed, or exited on its own before the harness finished."""
    if stage in ("start", "setup") and run.status not in ("timeout", "cpu"):
        raise EnvCrashed(f"kernel evaluation died before the solution ran ({run.status}, exit {run.exit_code}): "
                         f"{run.stderr[-1500:]}")
    compiled = stage in ("check", "timing")
    if run.status in ("timeout", "cpu"):
        return EvalResult(outcome="timeout", compiled=compiled, stage=stage, **base)
    code = run.exit_code
    sig = signal.Signals(-code).name if code is not None and code < 0 and -code in signal.Signals._value2member_map_ \
        else None
    reason = f"killed by {sig}" if sig else f"exited with code {code} before the harness reported ({run.status})"
    return EvalResult(outcome="crash", compiled=compiled, stage=stage, signal=sig, error=reason, **base)
