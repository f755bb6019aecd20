"""``agentrl export``: a range of a run's trajectories to JSONL or Parquet, with tokens and decoded text.

``agentrl import`` (agentrl/commands/import_.py) publishes such a file back into a run's stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from agentrl.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agentrl.inspect.cli import add_filter_arguments, add_run_arguments, add_start_argument

    add_run_arguments(p)
    p.add_argument("--output", "-o", required=True, help="file to write: .jsonl or .parquet")
    add_start_argument(p, "start")
    p.add_argument("--to", default=None, metavar="WHERE",
                   help="where to stop (inclusive): N or seq:N, an ISO time or a duration ago, or version:N "
                        "(keeps trajectories whose newest token is at most version N); default: the end")
    p.add_argument("--no-text", action="store_true", help="leave out the decoded text (no tokenizer needed)")
    add_filter_arguments(p)


def _stop_rule(text: str | None) -> tuple[str, float]:
    from agentrl.errors import ConfigError
    from agentrl.inspect.position import parse_start

    if text is None:
        return "end", 0.0
    stop = parse_start(text)
    if stop.kind not in ("seq", "time", "version"):
        raise ConfigError(f"--to {text!r}: expected N, seq:N, version:N, an ISO time or a duration ago")
    return stop.kind, stop.value


async def export(args: argparse.Namespace) -> tuple[int, int]:
    """Write the matching trajectories to ``args.output``; returns ``(written, read)``."""
    from agentrl.inspect.cli import filter_from, location_from, start_from
    from agentrl.inspect.exchange import open_writer
    from agentrl.inspect.reader import TrajectoryReader
    from agentrl.inspect.rows import row_of
    from agentrl.inspect.source import open_run
    from agentrl.inspect.summary import VersionClock, searchable_text, summarize
    from agentrl.inspect.tokens import load_token_text

    loc, filt, start = location_from(args), filter_from(args), start_from(args)
    stop_kind, stop_at = _stop_rule(args.to)
    tokens = None if args.no_text else load_token_text(loc, args.tokenizer)
    writer = open_writer(Path(args.output))
    written = read = 0
    clock = VersionClock()
    try:
        async with open_run(loc) as source:
            reader = TrajectoryReader(source, start, follow=False)
            async with contextlib.aclosing(reader.records()) as records:
                async for record in records:
                    if (stop_kind == "seq" and record.seq > stop_at) or (stop_kind == "time" and record.published > stop_at):
                        break
                    read += 1
                    summary = summarize(record, clock)
                    if stop_kind == "version" and summary.version_max > stop_at:
                        continue
                    if not filt.matches(summary, lambda r=record: searchable_text(r.traj)):  # type: ignore[misc]
                        continue
                    text = tokens.decode(record.traj.tokens.tolist()) if tokens is not None else None
                    writer.write(row_of(record, text))
                    written += 1
    finally:
        writer.close()
    return written, read


def run(args: argparse.Namespace) -> int:
    written, read = asyncio.run(export(args))
    print(f"wrote {written} of {read} trajectories read to {args.output}", file=sys.stderr)
    return 0


COMMAND = Command(name="export", help="write a range of a run's trajectories to JSONL or Parquet",
                  add_arguments=add_arguments, run=run)
