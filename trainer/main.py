"""Wire a learner from a :class:`~agentrl.config.RunConfig` and run it against the bus (``agentrl learner``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import msgspec
import torch
import transformers

from agentrl.bus.local import open_bus
from agentrl.config.loader import dump_config
from agentrl.config.run import RunConfig
from agentrl.contract import join_contract
from agentrl.tracking import Tracking, open_tracking
from trainer.backend import open_backend
from trainer.bus_adapter import BusLink, open_trajectory_consumer
from trainer.checkpoint import Checkpointer, LearnerState
from trainer.colocate import device_turns
from trainer.learner import Learner
from trainer.metrics import MetricsSink
from trainer.weight_broadcast import broadcast_sink
from trainer.weights import DiskWeightSink, WeightSink

__all__ = ["run_learner", "serve_learner"]

log = logging.getLogger(__name__)


async def serve_learner(cfg: RunConfig, url: str | None) -> LearnerState:
    """Run the learner until ``max_steps`` or SIGINT/SIGTERM; export the HF checkpoint (``final_dir`` when it
    reached ``max_steps``, else ``last/`` beside it).

    Without ``url`` it shares the run's embedded nats-server (or starts it), like every actor.
    """
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bars would fill learner.log
    if cfg.learner.torch_threads:
        torch.set_num_threads(cfg.learner.torch_threads)
    torch.manual_seed(cfg.seed)
    await asyncio.to_thread(dump_config, cfg, cfg.run_dir / "learner_config.yaml")  # what this run used
    tracking = await asyncio.to_thread(
        open_tracking, cfg.tracking, run_name=cfg.name, source="learner", config=msgspec.to_builtins(cfg))
    try:
        return await _serve(cfg, url, tracking)
    finally:
        await asyncio.to_thread(tracking.close)


async def _serve(cfg: RunConfig, url: str | None, tracking: Tracking) -> LearnerState:
    lc = cfg.learner
    run_dir = str(cfg.run_dir)
    with open_backend(lc, cfg.seed) as backend:  # megatron: starts (and at the end stops) its other ranks
        async with open_bus(cfg, url) as bus:
            await join_contract(bus, cfg.training, actor="learner")
            disk = DiskWeightSink(
                Path(lc.path(lc.weights_dir, run_dir)), keep=lc.keep_weights, base_model=Path(lc.model),
                blobs=bus if lc.publish_to_object_store else None, bucket=bus.subjects.weights_bucket,
            )
            link = BusLink(bus)  # distributed: announces each version before broadcasting it (weight_broadcast.py)
            weights: WeightSink = disk if lc.weight_sync == "disk" else broadcast_sink(
                cfg, disk, backend, lambda u: link.publish_control("weights", u, f"weights-{u.version}"))
            device = device_turns(cfg, backend)  # learner.colocate: the engines lend the device for each step
            learner = Learner(
                lc, cfg.training, backend, await open_trajectory_consumer(bus, lc), BusLink(bus), weights,
                Checkpointer(Path(lc.path(lc.checkpoint_dir, run_dir)), keep=lc.keep_checkpoints),
                MetricsSink(Path(lc.path(lc.metrics_file, run_dir)), bus, tracking=tracking), device,
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, learner.stop)
            try:
                state = await learner.run()
            finally:
                await device.close()
        final = Path(lc.path(lc.final_dir, run_dir))
        last_step = cfg.training.max_steps
        if last_step is None or state.step < last_step:  # stopped early: its weights are not the final model
            final = final.parent / "last"
        await asyncio.to_thread(disk.export_final, backend.export_hf, final)
    log.info("learner stopped at step %d, version %d; weights in %s", state.step, state.version, final)
    return state


def run_learner(cfg: RunConfig, url: str | None) -> LearnerState:
    """Run against ``url``, or against the run's embedded nats-server when it is None."""
    return asyncio.run(serve_learner(cfg, url))
