"""``agentrl import FILE --run NAME``: publish exported trajectories (JSONL or Parquet) into a run's stream.

For replay tests and offline experiments: the run gets the same trajectories, in file order, each
published with its id as ``Nats-Msg-Id`` (a repeated import inside the duplicate window stores nothing
twice). A stream that already holds trajectories is refused unless ``--append``, so an import never
feeds a live learner by accident.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agentrl.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a file written by `agentrl export` (.jsonl or .parquet)")
    p.add_argument("--run", required=True, help="run to publish into (the bus namespace)")
    p.add_argument("--nats", default=None, metavar="URL",
                   help="NATS server; default: the run directory's server (started if none runs)")
    p.add_argument("--dir", default=None, help="run directory (default: runs/<run>)")
    p.add_argument("--append", action="store_true", help="publish even if the run's stream already holds trajectories")


async def import_file(path: Path, run: str, url: str | None, run_dir: str | None, append: bool) -> int:
    """Publish every trajectory of ``path`` into ``run``'s stream; returns how many were published."""
    import nats.js.errors

    from agentrl.bus.local import open_bus
    from agentrl.config.run import RunConfig
    from agentrl.errors import ConfigError
    from agentrl.inspect.exchange import read_rows
    from agentrl.inspect.rows import trajectory_of

    rows = read_rows(path)
    cfg = RunConfig(name=run, dir=run_dir) if run_dir else RunConfig(name=run)
    async with open_bus(cfg, url) as bus:
        try:
            stored = (await bus.js.stream_info(bus.subjects.traj_stream)).state.messages
        except nats.js.errors.NotFoundError:
            stored = 0
        if stored and not append:
            raise ConfigError(f"run {run}: stream {bus.subjects.traj_stream} already holds {stored} trajectories; "
                              "pass --append to add to it")
        n = 0
        for row in rows:
            traj = trajectory_of(row)
            await bus.publish(bus.subjects.traj, traj, msg_id=traj.id)
            n += 1
    return n


def run(args: argparse.Namespace) -> int:
    n = asyncio.run(import_file(Path(args.file), args.run, args.nats, args.dir, args.append))
    print(f"published {n} trajectories into run {args.run}", file=sys.stderr)
    return 0


COMMAND = Command(name="import", help="publish exported trajectories into a run's stream (replay tests)",
                  add_arguments=add_arguments, run=run)
