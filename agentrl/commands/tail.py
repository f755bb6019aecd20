"""``agentrl tail``: print a run's trajectories as they land (or replay a stopped run's), filtered.

One line per trajectory by default (the format is in :mod:`agentrl.inspect.formatting`), the whole
transcript with ``--full``, or JSON lines with ``--json``. Read-only: see :mod:`agentrl.inspect.source`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import TextIO

from agentrl.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agentrl.inspect.cli import add_filter_arguments, add_run_arguments, add_start_argument

    add_run_arguments(p)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--full", action="store_true", help="the whole multi-turn transcript, loss mask visible")
    shape.add_argument("--json", action="store_true", help="one JSON object per line (the export row schema)")
    p.add_argument("--tokens", action="store_true", help="with --full: every token, trained ones marked")
    p.add_argument("--text", action="store_true", help="with --json: add the decoded text (needs a tokenizer)")
    p.add_argument("--follow", "-f", action=argparse.BooleanOptionalAction, default=None,
                   help="keep printing new trajectories (default: follow a live run, stop at the end of a stored one)")
    p.add_argument("--limit", "-n", type=int, default=0, help="stop after this many trajectories (0 = no limit)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colour the transcript")
    add_start_argument(p, "start")
    add_filter_arguments(p)


async def tail(args: argparse.Namespace, out: TextIO) -> int:
    """Print matching trajectories to ``out``; returns how many were printed."""
    from agentrl.inspect.cli import filter_from, location_from, start_from
    from agentrl.inspect.formatting import format_json, format_line, format_transcript
    from agentrl.inspect.reader import TrajectoryReader
    from agentrl.inspect.source import open_run
    from agentrl.inspect.summary import VersionClock, searchable_text, summarize
    from agentrl.inspect.tokens import load_token_text

    loc, filt, start = location_from(args), filter_from(args), start_from(args)
    colour = args.color == "always" or (args.color == "auto" and out.isatty())
    tokens = load_token_text(loc, args.tokenizer) if (args.full or args.text) else None
    shown, clock = 0, VersionClock()
    async with open_run(loc) as source:
        follow = source.live if args.follow is None else args.follow
        reader = TrajectoryReader(source, start, follow=follow)
        async with contextlib.aclosing(reader.records()) as records:
            async for record in records:
                summary = summarize(record, clock)
                if not filt.matches(summary, lambda r=record: searchable_text(r.traj)):  # type: ignore[misc]
                    continue
                if args.json:
                    text = tokens.decode(record.traj.tokens.tolist()) if tokens is not None else None
                    line = format_json(record, text)
                elif args.full:
                    line = format_transcript(record, summary, tokens=tokens, per_token=args.tokens, colour=colour) + "\n"
                else:
                    line = format_line(summary)
                print(line, file=out, flush=follow)
                shown += 1
                if args.limit and shown >= args.limit:
                    break
    return shown


def run(args: argparse.Namespace) -> int:
    try:
        asyncio.run(tail(args, sys.stdout))
    except BrokenPipeError:  # `agentrl tail ... | head`
        sys.stderr.close()
    return 0


COMMAND = Command(
    name="tail", help="print a run's trajectories as they land (or replay a stored run), filtered",
    add_arguments=add_arguments, run=run,
)
