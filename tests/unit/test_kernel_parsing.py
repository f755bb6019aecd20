"""Kernel generation, pure parts: problem parsing, code extraction, rewards and credit, result interpretation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentrl.errors import ConfigError, EnvCrashed
from envs.kernelgen import harness
from envs.kernelgen.evaluate import EvalConfig, interpret
from envs.kernelgen.extract import extract_code
from envs.kernelgen.feedback import feedback_text
from envs.kernelgen.problem import load_problem, load_problems, parse_problem
from envs.kernelgen.reward import RewardConfig, episode_reward, turn_score
from envs.sandbox import SandboxResult

SHIPPED = Path(__file__).resolve().parents[2] / "envs" / "kernelgen" / "problems"
GOOD = "import torch\nclass Model(torch.nn.Module):\n    pass\ndef get_inputs():\n    return []\ndef get_init_inputs():\n    return []\n"


def test_shipped_problems_parse_with_their_settings() -> None:
    problems = load_problems(SHIPPED)
    assert len(problems) >= 20 and len({p.name for p in problems}) == len(problems)
    assert {p.group for p in problems} == {"problems"}
    matmul = next(p for p in problems if p.name == "18_matmul")
    assert matmul.settings == {"atol": 2e-2, "rtol": 2e-2}
    assert matmul.env_args()["reference"] == matmul.source and matmul.env_args()["problem"] == "18_matmul"


@pytest.mark.parametrize(("source", "message"), [
    ("def f(:\n", "not valid Python"),
    ("class Model: pass\n", "missing def get_inputs, def get_init_inputs"),
    ("def Model(): pass\ndef get_inputs(): pass\ndef get_init_inputs(): pass\n", "missing class Model"),
    (GOOD + "KERNELGEN = {'atol': -1}\n", "expected a number >= 0"),
    (GOOD + "KERNELGEN = {'speed': 1}\n", "key 'speed' unknown"),
    (GOOD + "KERNELGEN = {'forbid': 'matmul'}\n", "expected a list of op names"),
    (GOOD + "KERNELGEN = dict(atol=1)\n", "must be a literal dict"),
])
def test_bad_problems_name_what_is_wrong(source: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_problem("p1", source)


def test_problem_settings_and_directory_errors(tmp_path: Path) -> None:
    assert parse_problem("p", GOOD + "KERNELGEN = {'atol': 1, 'forbid': ['torch.mm']}\n").settings == {
        "atol": 1.0, "forbid": ["torch.mm"]}
    with pytest.raises(ConfigError, match="does not exist"):
        load_problems(tmp_path / "nope")
    with pytest.raises(ConfigError, match="has no"):
        load_problems(tmp_path)
    (tmp_path / "level1").mkdir()
    (tmp_path / "level1" / "1_copy.py").write_text(GOOD)
    (tmp_path / "level1" / "__init__.py").write_text("")
    assert [(p.name, p.group) for p in load_problems(tmp_path / "level1")] == [("1_copy", "level1")]
    with pytest.raises(ConfigError, match="cannot read"):
        load_problem(tmp_path / "missing.py")


@pytest.mark.parametrize(("text", "code"), [
    ("```python\na = 1\n```", "a = 1"),
    ("first\n```python\na = 1\n```\nthen\n```py\nb = 2\n```\nend", "b = 2"),
    ("```\nplain = 1\n```", "plain = 1"),
    ("<think>```python\nwrong = 1\n```</think>\n```python\nright = 1\n```", "right = 1"),
    ("```python\ncut = 1\ndef f(", "cut = 1\ndef f("),  # the reply hit max_new_tokens inside its block
    ("no code here", None),
    ("```python\n\n```", None),
    ("<think>unfinished thought ```python\nx = 1\n```", None),
])
def test_extract_last_code_block(text: str, code: str | None) -> None:
    assert extract_code(text) == code


def test_turn_scores_follow_tritonforge() -> None:
    cfg = RewardConfig()
    assert turn_score(cfg, compiled=False, correct=False, cheated=False) == 0.0
    assert turn_score(cfg, compiled=True, correct=False, cheated=False) == 0.1
    assert turn_score(cfg, compiled=True, correct=True, cheated=False) == 0.3
    assert turn_score(cfg, compiled=True, correct=True, cheated=True) == 0.0
    assert turn_score(cfg, compiled=True, correct=True, cheated=False, speedup_eager=0.5) == 0.3
    assert turn_score(cfg, compiled=True, correct=True, cheated=False, speedup_eager=1.5) == pytest.approx(0.8)
    assert turn_score(cfg, compiled=True, correct=True, cheated=False, speedup_eager=10.0) == pytest.approx(2.3)
    on_compile = RewardConfig(speed_baseline="compile", speed_weight=0.5)
    assert turn_score(on_compile, compiled=True, correct=True, cheated=False, speedup_eager=3.0,
                      speedup_compile=1.2) == pytest.approx(0.4)


def test_multi_turn_credit_options() -> None:
    scores = [0.1, 0.3, 0.0]
    assert episode_reward(RewardConfig(credit="last"), scores) == 0.0
    assert episode_reward(RewardConfig(credit="best"), scores) == 0.3
    assert episode_reward(RewardConfig(credit="improvement"), scores) == pytest.approx(0.3 + 0.5 * 0.2)
    assert episode_reward(RewardConfig(credit="improvement"), [0.3, 0.1]) == 0.3
    assert episode_reward(RewardConfig(), []) == 0.0
    with pytest.raises(ConfigError, match="credit='first'"):
        RewardConfig(credit="first")  # type: ignore[arg-type]


def _run(stdout: str = "", stderr: str = "", status: str = "ok", code: int | None = 0) -> SandboxResult:
    return SandboxResult(status=status, stdout=stdout, stderr=stderr, exit_code=code, seconds=1.5)  # type: ignore[arg-type]


def _line(tag: str, nonce: str, body: str) -> str:
    return f"{tag} {nonce} {body}\n"


def test_interpret_reads_only_lines_with_the_nonce() -> None:
    forged = {"stage": "done", "compiled": True, "correct": True}
    real = {"stage": "run", "compiled": True, "correct": False, "mismatch": {"kind": "shape"}, "violations": []}
    out = (_line(harness.STAGE_TAG, "n1", "run 0") + _line(harness.RESULT_TAG, "n1", json.dumps(real))
           + _line(harness.RESULT_TAG, "forged", json.dumps(forged)) + _line(harness.STAGE_TAG, "forged", "done 0"))
    r = interpret(_run(out), "n1", EvalConfig())
    assert (r.outcome, r.compiled, r.correct, r.stage) == ("wrong", True, False, "run")


def test_interpret_deaths_by_stage_and_signal() -> None:
    cfg = EvalConfig()
    staged = _line(harness.STAGE_TAG, "n", "setup -1") + _line(harness.STAGE_TAG, "n", "run 0")
    crash = interpret(_run(staged, status="crash", code=-11), "n", cfg)
    assert (crash.outcome, crash.signal, crash.compiled, crash.stage) == ("crash", "SIGSEGV", False, "run")
    later = interpret(_run(staged + _line(harness.STAGE_TAG, "n", "check 1"), status="crash", code=-6), "n", cfg)
    assert (later.signal, later.compiled) == ("SIGABRT", True)
    timeout = interpret(_run(staged, status="timeout", code=-9), "n", cfg)
    assert (timeout.outcome, timeout.stage) == ("timeout", "run")
    exited = interpret(_run(staged, status="error", code=3), "n", cfg)
    assert exited.outcome == "crash" and "exited with code 3" in exited.error


def test_cuda_faults_reported_as_exceptions_are_crashes() -> None:
    """On a GPU an out-of-bounds store surfaces as a Python exception (the process lives): still a crash."""
    tb = ('Traceback (most recent call last):\n  File "solution.py", line 21, in forward\n'
          "RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered\n")
    body = {"stage": "run", "compiled": True, "correct": False, "violations": [], "error": tb}
    r = interpret(_run(_line(harness.RESULT_TAG, "n", json.dumps(body))), "n", EvalConfig())
    assert (r.outcome, r.compiled, r.stage) == ("crash", True, "run")
    text = feedback_text(r)
    assert "crashed during the first forward call: RuntimeError: Triton Error [CUDA]: an illegal memory" in text
    assert 'File "solution.py", line 21' in text
    for error in ("RuntimeError: shape '[4]' is invalid for input of size 8",  # an error, not a device fault
                  "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"):
        plain = interpret(_run(_line(harness.RESULT_TAG, "n", json.dumps({**body, "error": error}))), "n", EvalConfig())
        assert plain.outcome == "error"


def test_harness_and_start_up_failures_are_not_the_policys() -> None:
    cfg = EvalConfig()
    with pytest.raises(EnvCrashed, match="died before the solution ran"):
        interpret(_run(_line(harness.STAGE_TAG, "n", "setup -1"), status="error", code=1, stderr="no torch"), "n", cfg)
    body = json.dumps({"stage": "setup", "harness_error": True, "error": "CUDA error: no device"})
    with pytest.raises(EnvCrashed, match="CUDA error: no device"):
        interpret(_run(_line(harness.RESULT_TAG, "n", body)), "n", cfg)


def test_op_names_and_forbidden_ops() -> None:
    class Packet:
        __name__ = "_softmax"

    class Op:
        overloadpacket = Packet()

    assert harness.op_name(Op()) == "softmax"
    assert harness.forbidden_ops({}, {"mm", "empty", "view", "add"}) == {"mm", "add"}
    assert harness.forbidden_ops({"forbid": ["torch.matmul", "aten.mm"]}, {"add"}) == {"matmul", "mm"}
    assert harness.forbidden_ops({"forbid": []}, {"add"}) == set()
