"""Prompt datasets: JSONL, Parquet and saved Hugging Face datasets; epochs, seeded shuffle, group fan-out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agentrl.config.controller import DatasetConfig
from agentrl.controller.dataset import DatasetCursor, PromptDataset, load_rows
from agentrl.errors import ConfigError
from agentrl.messages import SamplingParams

ROWS = [
    {"prompt": "What is 2+2?", "label": "4", "source": "gsm"},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "label": "x"},
    {"prompt": [1, 2, 3], "label": None, "env": "calc", "env_args": {"k": 1}},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_jsonl_rows_and_prompt_kinds(tmp_path: Path) -> None:
    cfg = DatasetConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), env="math")
    ds = PromptDataset.load(cfg)
    assert len(ds) == 3
    t0 = ds.group_tasks(0, "g0", 1, SamplingParams(), version=0)[0]
    assert t0.prompt is not None and t0.prompt[0].content == "What is 2+2?" and t0.prompt[0].role == "user"
    assert t0.label == "4" and t0.env == "math" and t0.metadata == {"source": "gsm", "row": 0}
    t1 = ds.group_tasks(1, "g1", 1, SamplingParams(), version=0)[0]
    assert t1.prompt is not None and [m.role for m in t1.prompt] == ["system", "user"]
    t2 = ds.group_tasks(2, "g2", 1, SamplingParams(), version=3)[0]
    assert t2.prompt is None and t2.prompt_ids is not None and t2.prompt_ids.tolist() == [1, 2, 3]
    assert t2.env == "calc" and t2.env_args == {"k": 1} and t2.admitted_version == 3


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = DatasetConfig(path=str(tmp_path / "d.parquet"), prompt_key="question", label_key="answer")
    ds = PromptDataset.load(cfg)
    task = ds.group_tasks(4, "g", 1, SamplingParams(), version=0)[0]
    assert task.prompt is not None and task.prompt[0].content == "q4" and task.label == "4"


def test_hf_dataset_saved_on_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["a", "b", "c"], "label": ["1", "2", "3"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "hf"))
    ds = PromptDataset.load(DatasetConfig(path=str(tmp_path / "hf")))
    assert [r["prompt"] for r in ds.rows] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="no split 'test'"):
        load_rows(DatasetConfig(path=str(tmp_path / "hf"), split="test"))


def test_group_fan_out(tmp_path: Path) -> None:
    ds = PromptDataset.load(DatasetConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS))))
    tasks = ds.group_tasks(0, "g7", 4, SamplingParams(temperature=0.5), version=2)
    assert [t.id for t in tasks] == ["g7-0", "g7-1", "g7-2", "g7-3"]
    assert {t.group_id for t in tasks} == {"g7"} and all(t.group_size == 4 for t in tasks)
    assert [t.index_in_group for t in tasks] == [0, 1, 2, 3]
    assert all(t.sampling.temperature == 0.5 for t in tasks)


def test_epochs_and_seeded_shuffle(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}"} for i in range(10)]
    cfg = DatasetConfig(path="mem", shuffle=True)
    a, b = PromptDataset(rows, cfg, seed=1), PromptDataset(rows, cfg, seed=1)
    assert np.array_equal(a.order(0), b.order(0))
    assert sorted(a.order(0).tolist()) == list(range(10))
    assert not np.array_equal(a.order(0), a.order(1))  # each epoch reshuffles
    assert not np.array_equal(a.order(0), PromptDataset(rows, cfg, seed=2).order(0))
    seen, cursor = [], DatasetCursor()
    while (step := a.advance(cursor, epochs=2)) is not None:
        index, cursor = step
        seen.append(index)
    assert len(seen) == 20 and sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] == a.order(0).tolist() and cursor == DatasetCursor(epoch=1, position=10)


def test_unshuffled_order_is_identity() -> None:
    ds = PromptDataset([{"prompt": "x"}] * 4, DatasetConfig(shuffle=False))
    assert ds.order(3).tolist() == [0, 1, 2, 3]


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_rows(DatasetConfig(path=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_rows(DatasetConfig(path=str(bad)))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"dataset\.format"):
        load_rows(DatasetConfig(path=str(tmp_path / "d.txt")))
    ds = PromptDataset([{"question": "q"}], DatasetConfig(path="p"))
    with pytest.raises(ConfigError, match="no prompt field 'prompt'"):
        ds.group_tasks(0, "g", 1, SamplingParams(), version=0)
    ds = PromptDataset([{"prompt": 3}], DatasetConfig(path="p"))
    with pytest.raises(ConfigError, match="must be a string"):
        ds.group_tasks(0, "g", 1, SamplingParams(), version=0)
