"""``agentrl inspect`` (alias ``agentrl view``): the live web viewer of a run's trajectories (see agentrl/inspect/web.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from agentrl.commands import Command, setup_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agentrl.inspect.cli import add_run_arguments

    add_run_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port to serve on (0 = any free port; default 8765)")
    p.add_argument("--from", dest="start", default=None, metavar="WHERE",
                   help="where to start reading (as for tail; default: the last --max-rows trajectories)")
    p.add_argument("--follow", action=argparse.BooleanOptionalAction, default=None,
                   help="keep reading new trajectories (default: when the run is live)")
    p.add_argument("--max-rows", type=int, default=20_000,
                   help="trajectories kept in memory (oldest dropped first; default 20000)")
    p.add_argument("--text-chars", type=int, default=4_000,
                   help="characters of each trajectory's text kept for the text filter (default 4000)")


async def serve(args: argparse.Namespace) -> None:
    from agentrl.inspect.cli import location_from
    from agentrl.inspect.position import parse_start
    from agentrl.inspect.viewer import ViewerOptions, run_viewer

    opts = ViewerOptions(host=args.host, port=args.port, start=parse_start(args.start) if args.start else None,
                         follow=args.follow, max_rows=args.max_rows, text_chars=args.text_chars,
                         tokenizer=args.tokenizer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with run_viewer(location_from(args), opts) as url:
        print(f"viewer of run {args.run or args.config}: {url}  (Ctrl-C stops it)", flush=True)
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    setup_logging()
    asyncio.run(serve(args))
    return 0


COMMAND = Command(name="inspect", help="serve the live web viewer of a run's trajectories", add_arguments=add_arguments, run=run)
