"""Pure parts of inspection: filters, --from, summaries, tail's formats, export rows and files, the viewer's index."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from agentrl.errors import ConfigError, DecodeError
from agentrl.inspect.advantages import load_group_advantages, normalised_rewards
from agentrl.inspect.exchange import open_writer, read_rows
from agentrl.inspect.filters import parse_filter, parse_range
from agentrl.inspect.formatting import format_line, format_transcript, segments, short_id
from agentrl.inspect.index import TrajectoryIndex
from agentrl.inspect.live import LiveHub
from agentrl.inspect.position import Start, parse_start
from agentrl.inspect.rows import row_of, trajectory_of
from agentrl.inspect.summary import Record, VersionClock, searchable_text, summarize
from agentrl.inspect.synthetic import synthetic_group
from agentrl.messages import Trajectory, encode


def records(groups: int = 3, resumed: int = 1, seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    trajs = [t for g in range(groups) for t in synthetic_group(rng, version=g, resumed=resumed)]
    return [Record(i + 1, 1000.0 + i, t) for i, t in enumerate(trajs)]


def resumed_record() -> Record:
    return next(r for r in records() if r.traj.attempt == 1)


# ---------------------------------------------------------------- filters


def test_parse_range_forms_and_errors() -> None:
    assert parse_range("0.5:1", "reward") == (0.5, 1.0)
    assert parse_range(":0", "reward") == (None, 0.0)
    assert parse_range("3", "versions") == (3.0, 3.0)
    assert parse_range("2:", "versions") == (2.0, None)
    with pytest.raises(ConfigError, match="--reward 'a:b'"):
        parse_range("a:b", "reward")
    with pytest.raises(ConfigError, match="low end 2 is above the high end 1"):
        parse_range("2:1", "versions")


def test_parse_filter_rejects_bad_values_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown status done"):
        parse_filter({"status": "completed,done"})
    with pytest.raises(ConfigError, match="--grep"):
        parse_filter({"grep": "("})
    with pytest.raises(ConfigError, match="unknown filter colour"):
        parse_filter({"colour": "red"})
    with pytest.raises(ConfigError, match="--eval 'maybe'"):
        parse_filter({"eval": "maybe"})


def _kept(params: dict[str, object], recs: list[Record]) -> list[Record]:
    filt = parse_filter(params)
    return [r for r in recs if filt.matches(summarize(r), lambda r=r: searchable_text(r.traj))]


def test_each_filter_keeps_exactly_the_matching_trajectories() -> None:
    recs = records(groups=4)
    by = lambda pred: [r for r in recs if pred(r.traj)]  # noqa: E731
    assert _kept({}, recs) == recs
    assert _kept({"reward": "1:"}, recs) == by(lambda t: t.reward >= 1)
    assert _kept({"status": "aborted"}, recs) == by(lambda t: t.status == "aborted")
    assert _kept({"aborted": True}, recs) == by(lambda t: t.status == "aborted")
    assert _kept({"resumed": True}, recs) == by(lambda t: t.attempt == 1)
    assert _kept({"versions": "2:2"}, recs) == by(lambda t: 2 in set(t.versions[t.versions >= 0].tolist()))
    assert _kept({"env": "other"}, recs) == []
    assert _kept({"worker": "worker-*"}, recs) == recs
    assert _kept({"worker": "w?"}, recs) == []
    assert _kept({"eval": "1"}, recs) == []
    problem = recs[0].traj.metadata["problem"]
    assert _kept({"grep": problem.replace("*", r"\*")}, recs) == by(lambda t: t.metadata["problem"] == problem)
    task = recs[0].traj.task_id
    assert _kept({"task": task[:10]}, recs) == by(lambda t: t.task_id == task)
    assert len(_kept({"group": recs[0].traj.group_id, "status": "completed"}, recs)) == 4


# ---------------------------------------------------------------- --from


def test_parse_start_forms() -> None:
    assert parse_start("") == Start("all")
    assert parse_start("end") == Start("new")
    assert parse_start("42") == Start("seq", 42)
    assert parse_start("seq:7") == Start("seq", 7)
    assert parse_start("last:10") == Start("last", 10)
    assert parse_start("version:3") == parse_start("v3") == Start("version", 3)
    assert parse_start("10m", now=1000.0) == Start("time", 400.0)
    assert parse_start("-2h", now=10_000.0) == Start("time", 2800.0)
    assert parse_start("2025-01-31T12:00:00+00:00") == Start("time", 1738324800.0)
    for bad in ("seq:0", "last:x", "yesterday", "vx"):
        with pytest.raises(ConfigError, match="--from"):
            parse_start(bad)


# ---------------------------------------------------------------- summaries and formats


def test_summary_of_a_resumed_episode() -> None:
    clock = VersionClock(5)
    s = summarize(resumed_record(), clock)
    assert (s.attempt, s.aborts, s.resumed, s.status) == (1, 1, True, "completed")
    assert (s.version_min, s.version_max) == (0, 1)
    assert s.staleness == 5  # the clock saw version 5: the oldest sampled token is 5 versions behind
    assert s.turns == 3 and s.trained == int(resumed_record().traj.loss_mask.sum())


def test_line_format() -> None:
    s = summarize(resumed_record())
    line = format_line(s)
    assert line.startswith(f"#{s.seq:<6} {short_id(s.id)}")
    for part in (f"g={s.group_id[:8]}", f"r={s.reward:+.3f}", "completed", "turns=3", f"tok={s.trained}/{s.tokens}",
                 "v0..1", "stale=1", "w=worker-0", "env=calculator", "attempt=1", "resumed", "aborts=1"):
        assert part in line
    assert short_id("0123456789abcdef-2") == "01234567-2"


def test_transcript_shows_prompt_turns_abort_and_mask() -> None:
    rec = resumed_record()
    text = format_transcript(rec, summarize(rec))
    assert "[prompt] tokens 0..64 masked 64" in text
    assert "[abort] at token" in text and "attempt 0 was cut here" in text
    assert "[tool calculator]" in text and "reward=0.0" in text
    assert text.count("[model]") == 3 and "trained" in text

    class Bytes:
        source = "bytes"

        def decode(self, ids: list[int]) -> str:
            return bytes(ids).decode()

        def pieces(self, ids: list[int]) -> list[str]:
            return [chr(i) for i in ids]

    per_token = format_transcript(rec, summarize(rec), tokens=Bytes(), per_token=True)  # type: ignore[arg-type]
    assert "⟦The answer is" in per_token and "<|im_start|>user" in per_token
    assert "\x1b[32m" in format_transcript(rec, summarize(rec), colour=True)


def test_segments_fill_tokens_no_turn_covers() -> None:
    traj = resumed_record().traj
    no_prompt_turn = msgspec.structs.replace(traj, turns=[t for t in traj.turns if t.kind != "prompt"])
    segs = list(segments(no_prompt_turn))
    assert (segs[0].kind, segs[0].start, segs[0].end, segs[0].turn) == ("prompt", 0, traj.prompt_len, None)
    covered = [i for s in segs for i in range(s.start, s.end)]
    assert covered == list(range(traj.num_tokens))


# ---------------------------------------------------------------- rows and files


def _same(a: Trajectory, b: Trajectory) -> bool:
    return encode(a) == encode(b)


def test_row_round_trip_is_exact_through_json() -> None:
    for rec in records():
        row = msgspec.json.decode(msgspec.json.encode(row_of(rec, "text")))
        assert row["seq"] == rec.seq and row["text"] == "text"
        assert _same(trajectory_of(row), rec.traj)


def test_trajectory_of_names_what_is_wrong() -> None:
    row = row_of(records()[0])
    with pytest.raises(DecodeError, match="missing tokens"):
        trajectory_of({k: v for k, v in row.items() if k != "tokens"})
    with pytest.raises(DecodeError, match="misaligned"):
        trajectory_of({**row, "logprobs": row["logprobs"][:-1]})


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_files_round_trip(tmp_path: Path, suffix: str) -> None:
    recs = records(groups=3)
    path = tmp_path / f"out{suffix}"
    writer = open_writer(path)
    for rec in recs:
        writer.write(row_of(rec, f"text of {rec.seq}"))
    writer.close()
    rows = list(read_rows(path))
    assert [r["seq"] for r in rows] == [r.seq for r in recs]
    assert [r["text"] for r in rows] == [f"text of {r.seq}" for r in recs]
    assert all(_same(trajectory_of(row), rec.traj) for row, rec in zip(rows, recs, strict=True))


def test_export_files_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown file type '\.csv'"):
        open_writer(tmp_path / "x.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(DecodeError, match=r"bad\.jsonl:2"):
        list(read_rows(bad))
    with pytest.raises(ConfigError, match="no such file"):
        read_rows(tmp_path / "missing.parquet")


# ---------------------------------------------------------------- the viewer's index


def test_index_is_bounded_and_pages_newest_first() -> None:
    recs = records(groups=6)  # 30 trajectories
    index = TrajectoryIndex(max_rows=10)
    hub = LiveHub(index)
    completed = hub.connect(parse_filter({"status": "completed"}))
    for rec in recs:
        index.add(rec)
    assert len(index) == 10 and index.head_seq == recs[-1].seq
    assert index.get(recs[0].seq) is None
    total, page = index.query(parse_filter({}), offset=2, limit=3)
    assert total == 10 and [s.seq for s in page] == [recs[-3].seq, recs[-4].seq, recs[-5].seq]
    total, page = index.query(parse_filter({}), max_seq=recs[-2].seq, limit=1)
    assert total == 9 and page[0].seq == recs[-2].seq
    assert completed.total == index.query(parse_filter({"status": "completed"}), limit=0)[0]
    added, fresh = completed.take()
    assert added == sum(r.traj.status == "completed" for r in recs) and len(fresh) == added
    last = recs[-1].traj
    assert {s.seq for s in index.group(last.group_id)} == {r.seq for r in recs[-5:]}
    assert index.query(parse_filter({"grep": "answer is"}), limit=0)[0] == 8  # text is searched


def test_index_text_is_truncated_and_compressed() -> None:
    index = TrajectoryIndex(max_rows=5, text_chars=10)
    rec = records()[0]
    entry = index.add(rec)
    assert entry.text() == searchable_text(rec.traj)[:10]
    with pytest.raises(ValueError, match="max_rows=0"):
        TrajectoryIndex(max_rows=0)


# ---------------------------------------------------------------- advantages


def test_group_advantages_use_the_runs_function_or_fall_back() -> None:
    from trainer.advantages import grpo, rloo

    rewards = [1.0, 0.0, 0.0, 1.0, 1.0]
    for path, fn in (("trainer.advantages.grpo", grpo), ("trainer.advantages:rloo", rloo)):
        adv = load_group_advantages(path)
        expected = fn(torch.tensor(rewards), torch.zeros(5, dtype=torch.long)).tolist()
        assert adv.source == path and np.allclose(adv.compute(rewards), expected)
    fallback = load_group_advantages("no.such.module")
    assert "group-normalised" in fallback.source
    assert np.allclose(fallback.compute(rewards), normalised_rewards(rewards))
    assert normalised_rewards([3.0]) == [0.0]
    mean, std = np.mean(rewards), np.std(rewards, ddof=1)
    assert np.allclose(normalised_rewards(rewards), (np.array(rewards) - mean) / (std + 1e-6))


def test_an_abort_inside_a_merged_model_turn_splits_it_at_the_cut() -> None:
    """The runtime merges a resumed generation into the turn it continues; the abort marker stays where it fell."""
    traj = resumed_record().traj
    model_a, abort, model_b = traj.turns[1:4]
    merged = msgspec.structs.replace(model_a, end=model_b.end, text=model_a.text + model_b.text)
    traj = msgspec.structs.replace(traj, turns=[traj.turns[0], abort, merged, *traj.turns[4:]])
    segs = list(segments(traj))
    assert [(s.kind, s.start, s.end, s.part) for s in segs[:4]] == [
        ("prompt", 0, traj.prompt_len, 0), ("model", model_a.start, abort.start, 1),
        ("abort", abort.start, abort.start, 0), ("model", abort.start, model_b.end, 2)]
    text = format_transcript(resumed_record(), summarize(resumed_record()))
    assert "[model (part" not in text  # unmerged turns are not split
    text = format_transcript(Record(1, 0.0, traj), summarize(Record(1, 0.0, traj)))
    assert "[model (part 1)]" in text and "[model (part 2)]" in text and "(the whole turn)" in text
