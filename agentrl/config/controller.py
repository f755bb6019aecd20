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
    at_end: bool = True  # and the final one (version training.max_steps), when max_steps is set
    group_size: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_prompts: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # greedy by default


class ControllerConfig(Section):
    """Admission control, APRIL over-provisioning and eval passes. B, the group size, η and ``max_steps`` are
    the ``training:`` section's (:class:`~agentrl.config.training.TrainingConfig`), shared with the learner.

    * ``april_alpha``: ``None`` = no in-flight cap; a number keeps up to ``ceil(B * (1 + alpha))`` training tasks
      in flight (over-provisioning). With ``abort_on_update`` the long tail is cut at weight updates instead
      of waited for (see :mod:`agentrl.controller.april`).
    """

    dataset: DatasetConfig = msgspec.field(default_factory=DatasetConfig)
    april_alpha: Annotated[float, msgspec.Meta(ge=0)] | None = None
    # abort engines' in-flight requests when they load new weights (SGLang's abort_all_requests); the episodes
    # resume at once, token for token. For engines that drain before an update (SGLang, engine.weight_update:
    # drain); the embedded engine's default swaps weights between decode steps and needs no abort.
    abort_on_update: bool = False
    # a complete group still untrained max_staleness + this many versions after completing is counted as dropped
    # (a safety valve for a learner that drops without reporting it)
    presume_dropped_after: Annotated[int, msgspec.Meta(ge=1)] | None = 3
    epochs: Annotated[int, msgspec.Meta(ge=1)] | None = 1  # None = cycle forever
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    engines: list[str] = []  # engine base URLs told to load new weights on every WeightUpdate
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    metrics_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
