"""``agentrl controller``: admit tasks within the staleness bound, over-provision (APRIL), abort surplus,
sync engine weights and run eval passes (see agentrl/controller/)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import msgspec

from agentrl.commands import Command, add_common_arguments, load_run_config, setup_logging
from agentrl.config.run import RunConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--dataset", help="prompt dataset: .jsonl, .parquet or a saved HF dataset dir (controller.dataset.path)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit once every prompt was issued and every task finished (default: run until stopped)")


_FLAGS = {"dataset": "controller.dataset.path"}


async def serve(cfg: RunConfig, url: str | None, *, exit_when_done: bool) -> None:
    from agentrl.bus.local import open_bus
    from agentrl.client.engine import EngineClient
    from agentrl.contract import join_contract
    from agentrl.controller.controller import Controller, build_core
    from agentrl.controller.engine_load import EngineLoad
    from agentrl.controller.weights_sync import WeightsSync
    from agentrl.tracking import open_tracking

    cc, tc = cfg.controller, cfg.training
    async with open_bus(cfg, url) as bus:
        await join_contract(bus, tc, actor="controller")
        core = await build_core(bus, cc, tc, seed=cfg.seed)
        clients = [EngineClient(url) for url in cc.engines]
        weights = WeightsSync(clients, abort_in_flight=cc.abort_on_update) if clients else None
        load = EngineLoad(clients) if clients else None
        tracking = await asyncio.to_thread(open_tracking, cfg.tracking, run_name=cfg.name, source="controller",
                                           config=msgspec.to_builtins(cfg))
        controller = Controller(bus, core, weights=weights, engine_load=load,
                                metrics_path=cfg.run_dir / "controller_metrics.jsonl", tracking=tracking)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, controller.stop)
        print(f"controller ready: {len(core.dataset)} prompts, B={tc.batch_size}, n={tc.group_size}, "
              f"eta={tc.max_staleness}, april_alpha={cc.april_alpha}", flush=True)
        try:
            await controller.run(exit_when_done=exit_when_done)
        finally:
            await asyncio.to_thread(tracking.close)
            if weights is not None:
                await weights.close()


def run(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = load_run_config(args, _FLAGS)
    asyncio.run(serve(cfg, args.nats or cfg.nats.url, exit_when_done=args.exit_when_done))
    return 0


COMMAND = Command(
    name="controller", help="admit tasks within the staleness bound, run APRIL partial rollouts and eval passes",
    add_arguments=add_arguments, run=run,
)
