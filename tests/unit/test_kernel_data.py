"""Kernel generation data: the dataset step (problem directory -> tasks) and the SFT template generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agentrl.config.controller import DatasetConfig
from agentrl.controller.dataset import PromptDataset
from agentrl.messages import SamplingParams
from envs.kernelgen import dataset, templates
from envs.kernelgen.problem import load_problems, parse_problem

SHIPPED = Path(__file__).resolve().parents[2] / "envs" / "kernelgen" / "problems"


def test_dataset_step_writes_tasks_the_controller_reads(tmp_path: Path) -> None:
    out = tmp_path / "tasks.jsonl"
    dataset.main(["--problems", str(SHIPPED), "--out", str(out), "--max-turns", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(load_problems(SHIPPED))
    row = rows[0]
    assert row["env"] == "kernelgen" and row["label"] == "01_relu" and row["max_turns"] == 2
    assert row["env_args"]["reference"] in row["prompt"][0]["content"]
    assert row["prompt"][0]["content"].startswith(dataset.FULL_INSTRUCTIONS)
    cfg = DatasetConfig(path=str(out), shuffle=False)
    task = PromptDataset.load(cfg).group_tasks(0, "g", 2, SamplingParams(), version=0)[0]
    assert task.env == "kernelgen" and task.env_args["problem"] == "01_relu" and task.metadata["max_turns"] == 2
    matmul = next(r for r in rows if r["label"] == "18_matmul")
    assert matmul["env_args"]["atol"] == 2e-2


def test_dataset_step_refuses_a_bad_directory(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(Exception, match="missing class Model"):
        dataset.main(["--problems", str(tmp_path), "--out", str(tmp_path / "t.jsonl")])


def test_ops_map_torch_to_triton() -> None:
    assert len(templates.OPS) == 10 and len({e.torch for e in templates.OPS}) == 10
    relu = next(e for e in templates.OPS if e.torch == "torch.relu(x)")
    assert relu.triton == "tl.maximum(x, 0.0)" and relu.inputs == ("x",)
    assert all(e.inputs == ("x", "y") for e in templates.OPS if "y" in e.torch)


def test_generated_problems_and_solutions_are_well_formed() -> None:
    expr = templates.Expression(torch="torch.exp(x) * y", triton="tl.exp(x) * y", inputs=("x", "y"))
    problem = parse_problem("p", templates.problem_source(expr, 1000))
    assert "N = 1000" in problem.source and "return torch.exp(x) * y" in problem.source
    masked = templates.solution_source(expr, masked=True)
    plain = templates.solution_source(expr, masked=False)
    assert "m = i < n" in masked and "triton.cdiv(n, 256)" in masked and masked.count("mask=m") == 3
    assert "mask" not in plain and "n // 256" in plain and "tl.store(out_ptr + i, tl.exp(x) * y)" in plain
    compile(masked, "masked", "exec")
    compile(plain, "plain", "exec")


def test_template_data_holds_out_every_rl_and_eval_problem(tmp_path: Path) -> None:
    templates.main(["--out", str(tmp_path), "--train", "20", "--eval", "10", "--demos", "60", "--masked-fraction",
                    "0.5", "--seed", "1"])
    train, evals = load_problems(tmp_path / "problems/train"), load_problems(tmp_path / "problems/eval")
    assert (len(train), len(evals)) == (20, 10)
    demos = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(demos) == 60

    def size(source: str) -> int:
        return int(re.search(r"N = (\d+)", source).group(1))  # type: ignore[union-attr]

    held = [p.source for p in train + evals]
    assert len(set(held)) == 30  # no problem twice
    assert {re.search(r"return (.*)\n", s).group(1) for s in held} == {e.torch for e in templates.OPS}  # type: ignore[union-attr]
    assert all(size(s) % templates.BLOCK for s in held)  # held-out sizes are ragged ...
    demo_prompts = [d["messages"][0]["content"] for d in demos]
    assert all(size(p) % templates.BLOCK == 0 for p in demo_prompts)  # ... the warm-up's are block multiples
    assert not {p.source.strip() for p in train + evals} & {p.split("```python\n")[1].rstrip("`\n") for p in demo_prompts}
    styles = ["mask=m" in d["messages"][1]["content"] for d in demos]
    assert 10 < sum(styles) < 50
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 120 and all(isinstance(t, str) for t in corpus)
