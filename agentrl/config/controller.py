"""Config of the controller actor: the prompt dataset, group/batch sizes, staleness and APRIL knobs."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agentrl.config.loader import Section

__all__ = ["ControllerConfig", "DatasetConfig", "EvalConfig"]

DatasetFormat = Literal["auto", "jsonl", "parquet", "hf"]


class DatasetConfig(Section):
    """Where prompts come from and which fields of a row mean what.

    A row's ``prompt_key`` field may be a string (one user message), a list of
    ``{role, content}`` chat messages, or a list of token ids.
    """

    path: str = ""
    format: DatasetFormat = "auto"  # auto: .jsonl/.json -> jsonl, .parquet -> parquet, a directory -> hf
    prompt_key: str = "prompt"
    label_key: str | None = "label"  # copied to Task.label when present
    env_key: str = "env"  # a row may name its environment; otherwise `env` below
    env: str = ""  # default environment name for every task
    shuffle: bool = True
    split: str | None = None  # for a saved DatasetDict: which split


class EvalConfig(Section):
    """Evaluation passes over a held-out set while training runs."""

    dataset: DatasetConfig | None = None
    interval: Annotated[int, msgspec.Meta(ge=1)] = 10  # an eval pass at every policy version divisible by this
    versions: list[Annotated[int, msgspec.Meta(ge=0)]] = []  # instead: exactly these policy versions
    at_start: bool = True  # also evaluate the initial policy (version 0)
    at_end: bool = True  # and the final one (version max_steps), when the controller's max_steps is set
    group_size: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_prompts: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # greedy by default


class ControllerConfig(Section):
    """Admission control (staleness bound), APRIL over-provisioning and dynamic sampling.

    * ``batch_size`` (B): trajectories per learner step; must be a multiple of ``group_size`` (n),
      because whole groups are admitted so the learner never waits on a group that cannot finish.
    * ``max_staleness`` (eta): admission allows ``accepted + running < (v + eta + 1) * B``; 0 = synchronous.
    * ``april_alpha``: ``None`` turns APRIL off; a number keeps at most ``ceil(B * (1 + alpha))``
      training tasks in flight and aborts in-flight surplus whenever the learner takes a batch.
    * ``stale_policy``: what the learner does with tokens older than eta: ``mask`` (loss mask 0) or
      ``drop`` (the trajectory is not trained and is reported). The learner enforces it (its own
      ``learner.batch.stale_policy`` must match); the controller counts such tokens apart from trained
      ones (``controller/stale_tokens``) and flags ``drop`` violations (``controller/stale_violations``).
    """

    dataset: DatasetConfig = msgspec.field(default_factory=DatasetConfig)
    group_size: Annotated[int, msgspec.Meta(ge=1)] = 8
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 64
    max_staleness: Annotated[int, msgspec.Meta(ge=0)] = 1
    april_alpha: Annotated[float, msgspec.Meta(ge=0)] | None = None
    stale_policy: Literal["drop", "mask"] = "mask"
    dynamic_sampling: bool = False
    # a complete group still untrained eta + this many versions after completing is counted as dropped
    presume_dropped_after: Annotated[int, msgspec.Meta(ge=1)] | None = 3
    epochs: Annotated[int, msgspec.Meta(ge=1)] | None = 1  # None = cycle forever
    max_steps: Annotated[int, msgspec.Meta(ge=1)] | None = None  # stop admitting after the tasks of this many steps
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    engines: list[str] = []  # engine base URLs told to load new weights on every WeightUpdate
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    metrics_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0

    def __post_init__(self) -> None:
        if self.batch_size % self.group_size:
            raise ValueError(
                f"controller.batch_size={self.batch_size} must be a multiple of "
                f"controller.group_size={self.group_size} (whole groups are admitted)"
            )
