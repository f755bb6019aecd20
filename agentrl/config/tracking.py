"""Config of experiment tracking (``tracking:``): where metrics go besides the run's JSONL files."""

from __future__ import annotations

from typing import Literal

from agentrl.config.loader import Section

__all__ = ["TrackingConfig"]


class TrackingConfig(Section):
    """Optional metric sinks beside the JSONL files; the learner and the controller each log to them.

    TensorBoard: one event-file directory per actor (``tensorboard_dir/learner``, ``tensorboard_dir/controller``);
    ``tensorboard --logdir runs/NAME/tensorboard`` shows them. Weights & Biases: one W&B run per actor, grouped by
    the run name; offline by default (files under ``wandb_dir/wandb``, uploaded later with ``wandb sync``).
    Learner metrics are plotted against the learner step, controller metrics against the policy version.
    Both need ``pip install -e '.[tracking]'``.
    """

    tensorboard: bool = False
    """write TensorBoard event files"""
    tensorboard_dir: str = "{run_dir}/tensorboard"
    """where the event files go (a subdirectory per actor)"""
    wandb: bool = False
    """log to Weights & Biases"""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline writes the W&B run under wandb_dir and uploads nothing; online streams it to the W&B server"""
    wandb_project: str = "agentrl"
    """W&B project"""
    wandb_entity: str | None = None
    """W&B entity (user or team); None = the logged-in default"""
    wandb_dir: str = "{run_dir}"
    """W&B writes its files under <wandb_dir>/wandb"""
