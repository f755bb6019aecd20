"""The feedback text of each outcome: what the model reads after a turn."""

from __future__ import annotations

from typing import Any

from envs.kernelgen.evaluate import EvalResult
from envs.kernelgen.feedback import feedback_text


def test_each_outcome_has_its_feedback() -> None:
    texts = {
        "no_code": feedback_text(EvalResult(outcome="no_code")),
        "compile": feedback_text(EvalResult(outcome="error", stage="run", error="CompilationError: at 3:4: bad")),
        "import": feedback_text(EvalResult(outcome="error", stage="import", error="SyntaxError: invalid syntax")),
        "crash": feedback_text(EvalResult(outcome="crash", stage="run", signal="SIGSEGV",
                                          stderr_tail='  File "solution.py", line 9 in kernel\nFatal')),
        "timeout": feedback_text(EvalResult(outcome="timeout", stage="check")),
        "violation": feedback_text(EvalResult(outcome="violation", violations=[
            {"rule": "no_triton", "detail": "launched no Triton kernel"}])),
    }
    assert "```python" in texts["no_code"]
    assert texts["compile"].startswith("Compilation or runtime error during the first forward call")
    assert texts["import"].startswith("Error during importing your module") and "SyntaxError" in texts["import"]
    assert "segmentation fault" in texts["crash"] and 'File "solution.py", line 9' in texts["crash"]
    assert "Time limit exceeded during a later forward call" in texts["timeout"]
    assert "- no_triton: launched no Triton kernel" in texts["violation"]


def test_mismatch_kinds() -> None:
    base = {"input_set": 1, "output": 0}
    values = {**base, "kind": "values", "count": 24, "total": 1000, "atol": 1e-3, "rtol": 1e-3, "max_abs": 2.5,
              "max_rel": 9.0, "index": [977], "got_value": 0.0, "want_value": 2.5, "first_bad": [976]}
    text = feedback_text(EvalResult(outcome="wrong", sets=3, mismatch=values))
    assert text.startswith("Output mismatch on input set 2 of 3, output 0: 24 of 1000 elements differ")
    assert "first wrong element at index (976,)" in text and "(got 0, expected 2.5)" in text
    shape = feedback_text(EvalResult(outcome="wrong", sets=3, mismatch={**base, "kind": "shape", "got": [10],
                                                                         "want": [5, 2]}))
    assert shape == "Wrong shape of output 0 on input set 2 of 3: got [10], expected [5, 2]."
    kinds: dict[str, dict[str, Any]] = {"type": {"got": "NoneType"}, "count": {"got": 2, "want": 1},
             "nonfinite": {"count": 3, "total": 9, "index": [0, 1], "got_value": float("nan")}}
    for kind, extra in kinds.items():
        assert "input set 2 of 3" in feedback_text(EvalResult(outcome="wrong", sets=3,
                                                              mismatch={**base, "kind": kind, **extra}))


def test_correct_feedback_reports_timing_or_its_absence() -> None:
    cpu = feedback_text(EvalResult(outcome="correct", correct=True, sets=3))
    assert cpu == "Correct on all 3 input sets. (Timing is off: kernels ran in the CPU interpreter.)"
    timed = EvalResult(outcome="correct", correct=True, sets=3,
                       timing={"solution_ms": 0.5, "eager_ms": 1.0, "compile_ms": 0.75})
    text = feedback_text(timed)
    assert "speedup 2.00x" in text and "torch.compile: 0.7500 ms (speedup 1.50x)" in text
    assert (timed.speedup_eager, timed.speedup_compile) == (2.0, 1.5)


def test_feedback_is_trimmed() -> None:
    long = feedback_text(EvalResult(outcome="error", stage="run", error="x" * 10_000), max_chars=300)
    assert len(long) <= 300 and long.endswith("(trimmed)")
