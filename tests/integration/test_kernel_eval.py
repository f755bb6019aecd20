"""Kernel evaluation in the real sandbox (Triton's CPU interpreter): every outcome and feedback kind, and
every anti-hacking rule — each cheating solution is caught, each honest one passes.

The cheats compute the right values, so only the rule under test can reject them. All evaluations run
once per module, two at a time (one per core), since each is a fresh ~2-3 s subprocess.
"""

from __future__ import annotations

import asyncio
import dataclasses
import textwrap
from pathlib import Path

import pytest

from envs.kernelgen.evaluate import EvalConfig, EvalResult, evaluate_solution
from envs.kernelgen.extract import extract_code
from envs.kernelgen.feedback import feedback_text
from envs.kernelgen.problem import Problem, load_problems

pytest.importorskip("triton")

KG = Path(__file__).resolve().parents[2] / "envs" / "kernelgen"
PROBLEMS = {p.name: p for p in load_problems(KG / "problems")}
# generous wall-clock limits: every evaluation is a fresh torch + triton process, slow on a loaded machine
CFG = EvalConfig(sets=3, limits=dataclasses.replace(EvalConfig().limits, wall_s=240.0, cpu_s=120))

HEAD = """
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def relu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.maximum(tl.load(x_ptr + offs, mask=mask), 0.0), mask=mask)


def relu(x, out=None):
    out = torch.empty_like(x) if out is None else out
    relu_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    return out
"""


def relu_solution(forward: str, extra: str = "") -> str:
    return HEAD + textwrap.dedent(extra) + "\n\nclass ModelNew(nn.Module):\n" + textwrap.indent(
        textwrap.dedent(forward), "    ")


# name -> (problem, solution source or None, config)
CASES: dict[str, tuple[str, str | None, EvalConfig]] = {
    "honest_relu": ("01_relu", (KG / "solutions/01_relu.py").read_text(), CFG),
    "honest_softmax": ("14_softmax", (KG / "solutions/14_softmax.py").read_text(), CFG),
    "honest_matmul": ("18_matmul", (KG / "solutions/18_matmul.py").read_text(), CFG),
    "honest_layer_norm": ("16_layer_norm", (KG / "solutions/16_layer_norm.py").read_text(), CFG),
    "no_code": ("01_relu", None, CFG),
    "syntax_error": ("01_relu", "import torch\nclass ModelNew(torch.nn.Module)\n    pass\n", CFG),
    "no_model_new": ("01_relu", "import torch\nclass Model2(torch.nn.Module):\n    pass\n", CFG),
    "compile_error": ("01_relu", HEAD.replace("tl.maximum(", "tl.no_such_function(") + """
class ModelNew(nn.Module):
    def forward(self, x):
        return relu(x)
""", CFG),
    "runtime_error": ("01_relu", relu_solution("def forward(self, x):\n    return relu(x, x[:10])[5000]\n"), CFG),
    "wrong_values": ("01_relu", HEAD.replace("0.0), mask=mask)", "0.1), mask=mask)") + """
class ModelNew(nn.Module):
    def forward(self, x):
        return relu(x)
""", CFG),
    "wrong_tail": ("01_relu", relu_solution("def forward(self, x):\n    out = torch.zeros_like(x)\n"
                                            "    relu(x[:900], out[:900])\n    return out\n"), CFG),
    "nonfinite": ("01_relu", relu_solution("def forward(self, x):\n    out = relu(x)\n"
                                           "    relu(x / 0.0, out[:1])\n    return out\n"), CFG),
    "wrong_shape": ("01_relu", relu_solution("def forward(self, x):\n    return relu(x).view(10, 100)\n"), CFG),
    "wrong_dtype": ("01_relu", relu_solution("def forward(self, x):\n    return relu(x.double())\n"), CFG),
    # an unmasked store at a wild offset (2**46 elements past the output: no mapped memory is there, so the
    # first store faults; a store just past the end may land in mapped heap and run on until the time limit)
    "crash_oob_store": ("01_relu", HEAD.replace("tl.store(out_ptr + offs,", "tl.store(out_ptr + offs + (1 << 46),")
                        .replace(", mask=mask), 0.0), mask=mask)", ", mask=mask), 0.0))") + """
class ModelNew(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        relu_kernel[(4,)](x, out, x.numel(), BLOCK=256)
        return out
""", CFG),
    "timeout": ("01_relu", relu_solution("def forward(self, x):\n    while True:\n        pass\n"),
                dataclasses.replace(CFG, limits=dataclasses.replace(CFG.limits, wall_s=25.0, cpu_s=25))),
    # --- cheats: right values, caught by a rule
    "cheat_torch_fallback": ("01_relu", "import torch\nclass ModelNew(torch.nn.Module):\n"
                                        "    def forward(self, x):\n        return torch.relu(x)\n", CFG),
    "cheat_forbidden_op": ("01_relu", relu_solution("def forward(self, x):\n    relu(x)\n    return torch.relu(x)\n"),
                           CFG),
    "cheat_functional": ("14_softmax", relu_solution("def forward(self, x):\n    relu(x)\n"
                                                     "    return torch.nn.functional.softmax(x, dim=1)\n"), CFG),
    "cheat_reference_call": ("01_relu", relu_solution(
        "def forward(self, x):\n    relu(x)\n    ref = sys.modules['_kernelgen_reference'].Model()\n    return ref(x)\n",
        extra="import sys\n"), CFG),
    "cheat_cached_output": ("01_relu", relu_solution(
        "cache = None\n\ndef forward(self, x):\n    if self.cache is None:\n        self.cache = relu(x)\n"
        "    return self.cache\n"), CFG),
    "cheat_returns_input": ("01_relu", relu_solution("def forward(self, x):\n    return relu(x, x)\n"), CFG),
    "cheat_mutates_input": ("02_add", HEAD + """
@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


class ModelNew(nn.Module):
    def forward(self, x, y):
        out = torch.empty_like(x)
        add_kernel[(triton.cdiv(x.numel(), 256),)](x, y, out, x.numel(), BLOCK=256)
        relu(y, y)  # scribbles on an input
        return out
""", CFG),
    "cheat_side_stream": ("01_relu", relu_solution(
        "def forward(self, x):\n    s = torch.cuda.Stream()\n    with torch.cuda.stream(s):\n        return relu(x)\n"),
        CFG),
    "cheat_side_thread": ("01_relu", relu_solution(
        "def forward(self, x):\n    out = torch.empty_like(x)\n    t = threading.Thread(target=relu, args=(x, out))\n"
        "    t.start()\n    t.join()\n    return out\n", extra="import threading\n"), CFG),
    "cheat_reads_reference_output": ("01_relu", relu_solution(
        "def forward(self, x):\n    relu(x)\n    found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)\n"
        "             and o.shape == x.shape and o is not x]\n    return found[-1] if found else relu(x)\n",
        extra="import gc\n"), CFG),
}

RULE_OF = {
    "cheat_torch_fallback": "no_triton", "cheat_forbidden_op": "forbidden_op", "cheat_functional": "forbidden_op",
    "cheat_reference_call": "reference_call", "cheat_cached_output": "cached_output",
    "cheat_returns_input": "output_aliases_input", "cheat_mutates_input": "input_mutation",
    "cheat_side_stream": "side_stream", "cheat_side_thread": "side_thread",
    "cheat_reads_reference_output": "introspection",
}


@pytest.fixture(scope="module")
def results() -> dict[str, EvalResult]:
    async def run_all() -> dict[str, EvalResult]:
        gate = asyncio.Semaphore(2)

        async def one(name: str) -> tuple[str, EvalResult]:
            problem_name, solution, cfg = CASES[name]
            problem: Problem = PROBLEMS[problem_name]
            async with gate:
                return name, await evaluate_solution(problem.source, solution, cfg, settings=problem.settings, seed=7)

        return dict(await asyncio.gather(*(one(n) for n in CASES)))

    return asyncio.run(run_all())


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("honest")])
def test_honest_solutions_are_correct(results: dict[str, EvalResult], name: str) -> None:
    r = results[name]
    assert (r.outcome, r.compiled, r.correct, r.violations) == ("correct", True, True, []), r
    assert r.sets_passed == 3 and r.timing is None  # no timing in CPU mode
    assert feedback_text(r).startswith("Correct on all 3 input sets.")


@pytest.mark.parametrize("name", sorted(RULE_OF))
def test_each_cheat_is_caught_by_its_rule(results: dict[str, EvalResult], name: str) -> None:
    r = results[name]
    assert r.outcome == "violation" and not r.correct, r
    assert RULE_OF[name] in [v["rule"] for v in r.violations], r.violations
    assert RULE_OF[name] in feedback_text(r)


def test_returning_an_input_is_also_an_input_mutation(results: dict[str, EvalResult]) -> None:
    rules = {v["rule"] for v in results["cheat_returns_input"].violations}
    assert rules == {"output_aliases_input", "input_mutation"}


def test_no_code_and_import_errors(results: dict[str, EvalResult]) -> None:
    assert results["no_code"].outcome == "no_code" and "No code found" in feedback_text(results["no_code"])
    syntax = results["syntax_error"]
    assert (syntax.outcome, syntax.stage, syntax.compiled) == ("error", "import", False)
    assert "SyntaxError" in syntax.error and "solution.py" in syntax.error
    assert results["no_model_new"].error == "the code defines no class ModelNew"


def test_compile_and_runtime_errors_show_the_cause(results: dict[str, EvalResult]) -> None:
    compile_error = results["compile_error"]
    assert (compile_error.outcome, compile_error.stage, compile_error.compiled) == ("error", "run", False)
    assert "no_such_function" in feedback_text(compile_error)
    runtime = results["runtime_error"]
    assert runtime.outcome == "error" and "IndexError" in runtime.error
    assert 'solution.py", line' in feedback_text(runtime)  # the solution's own frame, not the harness's


def test_mismatch_feedback_names_where_and_how_much(results: dict[str, EvalResult]) -> None:
    values = results["wrong_values"]
    assert (values.outcome, values.compiled) == ("wrong", True)
    assert values.mismatch is not None and values.mismatch["kind"] == "values" and values.mismatch["input_set"] == 0
    text = feedback_text(values)
    assert "Output mismatch on input set 1 of 3, output 0" in text and "Max abs error" in text
    tail = results["wrong_tail"]
    assert tail.mismatch is not None and tail.mismatch["first_bad"][0] >= 900
    assert "NaN/Inf" in feedback_text(results["nonfinite"])
    assert "Wrong shape of output 0" in feedback_text(results["wrong_shape"])
    assert "Wrong dtype of output 0" in feedback_text(results["wrong_dtype"])


def test_a_crash_is_contained_and_reported(results: dict[str, EvalResult]) -> None:
    crash = results["crash_oob_store"]
    assert crash.outcome == "crash" and crash.signal in ("SIGSEGV", "SIGABRT", "SIGBUS"), crash
    assert "out-of-bounds" in feedback_text(crash)


def test_an_endless_kernel_times_out(results: dict[str, EvalResult]) -> None:
    r = results["timeout"]
    assert r.outcome == "timeout" and not r.compiled
    # on an idle machine the limit falls in the first forward; a heavily loaded one may still be importing torch
    assert r.stage in ("run", "setup", "import") and "Time limit exceeded during" in feedback_text(r)


def test_extracted_reply_evaluates_like_the_file() -> None:
    reply = f"Here is my kernel.\n```python\n{(KG / 'solutions/01_relu.py').read_text()}```\nDone."
    assert extract_code(reply) == (KG / "solutions/01_relu.py").read_text().strip("\n")
