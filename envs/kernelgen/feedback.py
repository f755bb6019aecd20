"""The text a model reads after each turn: what went wrong (or how fast it was), trimmed to what helps."""

from __future__ import annotations

from typing import Any

from envs.kernelgen.evaluate import EvalResult, device_fault

__all__ = ["feedback_text"]

_STAGES = {"import": "importing your module", "init": "constructing ModelNew", "run": "the first forward call",
           "check": "a later forward call", "timing": "timing", "start": "start-up", "setup": "start-up"}
_SIGNALS = {"SIGSEGV": "a segmentation fault, usually an out-of-bounds load or store (check masks and the grid)",
            "SIGABRT": "an abort, usually memory corrupted by an out-of-bounds store (check masks and the grid)",
            "SIGBUS": "a bus error (misaligned or out-of-bounds memory access)",
            "SIGKILL": "SIGKILL (a resource limit: memory or CPU time)", "SIGXCPU": "the CPU-time limit"}


def feedback_text(result: EvalResult, *, max_chars: int = 2000) -> str:
    """One message for the model about ``result``; never longer than ``max_chars``."""
    text = {"no_code": _no_code, "error": _error, "crash": _crash, "timeout": _timeout, "violation": _violation,
            "wrong": _wrong, "correct": _correct}[result.outcome](result)
    return text if len(text) <= max_chars else text[: max_chars - 20] + "\n... (trimmed)"


def _no_code(r: EvalResult) -> str:
    return "No code found. Reply with the complete solution (class ModelNew with Triton kernels) in one ```python block."


def _error(r: EvalResult) -> str:
    what = "Compilation or runtime error" if r.stage == "run" else "Error"
    return f"{what} during {_STAGES.get(r.stage, r.stage)}:\n{_trim_traceback(r.error)}"


def _trim_traceback(error: str, keep: int = 1500) -> str:
    lines = [ln for ln in error.strip().splitlines() if ln.strip()]
    text = "\n".join(lines)
    return text if len(text) <= keep else "...\n" + text[-keep:]


def _crash(r: EvalResult) -> str:
    why = _SIGNALS.get(r.signal or "") or device_fault(r.error) or r.error or "an unknown reason"
    frames = [ln.strip() for ln in (r.stderr_tail + "\n" + r.error).splitlines() if "solution.py" in ln][-3:]
    where = ("\nLast lines of your code on the stack:\n" + "\n".join(frames)) if frames else ""
    return f"The evaluation process crashed during {_STAGES.get(r.stage, r.stage)}: {why}.{where}"


def _timeout(r: EvalResult) -> str:
    return (f"Time limit exceeded during {_STAGES.get(r.stage, r.stage)}: the kernel did not finish "
            f"(an endless loop, or far too much work per program).")


def _violation(r: EvalResult) -> str:
    rules = "\n".join(f"- {v['rule']}: {v['detail']}" for v in r.violations)
    return f"Rejected: the solution breaks the evaluation rules.\n{rules}\nWrite the computation as Triton kernels."


def _wrong(r: EvalResult) -> str:
    m: dict[str, Any] = r.mismatch or {}
    where = f"input set {m.get('input_set', 0) + 1} of {r.sets}"
    kind = m.get("kind")
    if kind == "type":
        return f"Wrong output on {where}: forward returned {m['got']}, expected a tensor (or a tuple of tensors)."
    if kind == "count":
        return f"Wrong output on {where}: forward returned {m['got']} tensors, expected {m['want']}."
    out = f"output {m.get('output', 0)}"
    if kind in ("shape", "dtype"):
        return f"Wrong {kind} of {out} on {where}: got {m['got']}, expected {m['want']}."
    if kind == "nonfinite":
        return (f"{out} has {m['count']} of {m['total']} NaN/Inf values where the reference is finite (first at index "
                f"{tuple(m['index'])}, value {m['got_value']}), on {where}.")
    return (f"Output mismatch on {where}, {out}: {m['count']} of {m['total']} elements differ beyond atol={m['atol']:g}, "
            f"rtol={m['rtol']:g}; first wrong element at index {tuple(m['first_bad'])}. Max abs error "
            f"{m['max_abs']:.4g} at index {tuple(m['index'])} (got {m['got_value']:.6g}, expected "
            f"{m['want_value']:.6g}); max rel error {m['max_rel']:.4g}.")


def _correct(r: EvalResult) -> str:
    head = f"Correct on all {r.sets} input sets."
    t = r.timing
    if not t:
        return head + " (Timing is off: kernels ran in the CPU interpreter.)"
    parts = [f"Your kernel: {t['solution_ms']:.4f} ms; PyTorch eager: {t['eager_ms']:.4f} ms "
             f"(speedup {r.speedup_eager:.2f}x)"]
    if r.speedup_compile is not None:
        parts.append(f"torch.compile: {t['compile_ms']:.4f} ms (speedup {r.speedup_compile:.2f}x)")
    return f"{head} {'; '.join(parts)}."
