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
    """a .jsonl/.json file, a .parquet file or a saved Hugging Face dataset directory"""
    format: DatasetFormat = "auto"
    """file format; auto: .jsonl/.json -> jsonl, .parquet -> parquet, a directory -> hf"""
    prompt_key: str = "prompt"
    """the row field holding the prompt (a string, a list of {role, content} messages, or token ids)"""
    label_key: str | None = "label"
    """the row field copied to Task.label (the reference answer) when present"""
    env_key: str = "env"
    """the row field naming its environment (rows without it use env)"""
    env: str = ""
    """default environment name for every task"""
    shuffle: bool = True
    """shuffle the rows (seeded by the run's seed) before issuing them"""
    split: str | None = None
    """which split of a saved DatasetDict"""


class EvalConfig(Section):
    """Evaluation passes over a held-out set while training runs."""

    dataset: DatasetConfig | None = None
    """held-out prompts; None = no eval passes"""
    interval: Annotated[int, msgspec.Meta(ge=1)] = 10
    """an eval pass at every policy version divisible by this"""
    versions: list[Annotated[int, msgspec.Meta(ge=0)]] = []
    """evaluate exactly these policy versions instead of every interval-th"""
    at_start: bool = True
    """also evaluate the initial policy (version 0)"""
    at_end: bool = True
    """also evaluate the final policy (version training.max_steps), when max_steps is set"""
    group_size: Annotated[int, msgspec.Meta(ge=1)] = 1
    """samples per eval prompt"""
    max_prompts: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """evaluate at most this many prompts of the eval set (None = all)"""
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """sampling temperature of eval tasks (0 = greedy)"""


class ControllerConfig(Section):
    """Admission control, APRIL over-provisioning and eval passes. B, the group size, η and ``max_steps`` are
    the ``training:`` section's (:class:`~agentrl.config.training.TrainingConfig`), shared with the learner.

    * ``april_alpha``: ``None`` = no in-flight cap; a number keeps up to ``ceil(B * (1 + alpha))`` training tasks
      in flight (over-provisioning). With ``abort_on_update`` the long tail is cut at weight updates instead
      of waited for (see :mod:`agentrl.controller.april`).
    """

    dataset: DatasetConfig = msgspec.field(default_factory=DatasetConfig)
    """the training prompts"""
    april_alpha: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """APRIL over-provisioning: keep up to ceil(B * (1 + alpha)) training tasks in flight; None = no cap"""
    abort_on_update: bool = False
    """abort engines' in-flight requests when they load new weights (SGLang's abort_all_requests); the
    episodes resume at once, token for token. For engines that drain before an update (SGLang,
    engine.weight_update: drain); the embedded engine's default swaps weights between decode steps and needs
    no abort."""
    presume_dropped_after: Annotated[int, msgspec.Meta(ge=1)] | None = 3
    """a complete group still untrained max_staleness + this many versions after completing is counted as
    dropped (a safety valve for a learner that drops without reporting it)"""
    epochs: Annotated[int, msgspec.Meta(ge=1)] | None = 1
    """passes over the training prompts; None = cycle forever"""
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256
    """per-turn generation budget copied into every task's sampling params"""
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """sampling temperature of training tasks"""
    engines: list[str] = []
    """engine base URLs told to load new weights on every WeightUpdate"""
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    """evaluation passes over a held-out set while training runs"""
    metrics_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """seconds between two controller metrics records"""
