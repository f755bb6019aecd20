"""One learner rank of the Megatron backend: its model stage, its optimizer shard, its share of each step.

Every public method is collective: all ranks call it with the same arguments (the leader broadcasts them,
:mod:`trainer.backend.megatron.driver`), and results are gathered to global rank 0 over the gloo control
group; other ranks get None.

A training step runs megatron-core's forward/backward schedule (1F1B across pipeline stages, or a plain loop)
over this DP rank's micro-batches (:func:`~trainer.backend.megatron.schedule.assign_micro_batches`). The
losses are already normalised over the whole step (``LossInputs.total_tokens``), so gradients are *summed*
over micro-batches and DP ranks: the model config asks for per-token loss scaling, which turns off
megatron's averaging, and the grad-finalising hook leaves the token scaling out. The optimizer is
megatron-core's (distributed) Adam with fp32 master weights; the LR follows
:func:`trainer.backend.torch_backend.lr_lambda` and clipping is by global norm, as in the torch backend.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoConfig

from agentrl.config.learner import LearnerConfig, LossConfig
from agentrl.errors import ConfigError
from trainer.backend.base import StepResult
from trainer.backend.megatron.attention import resolve_kernel
from trainer.backend.megatron.convert import (
    hf_to_megatron,
    megatron_to_hf,
    merge_shards,
    padded_vocab,
    shard,
)
from trainer.backend.megatron.model import ModelOptions, build_gpt
from trainer.backend.megatron.parallel import Rank
from trainer.backend.megatron.schedule import assign_micro_batches
from trainer.backend.megatron.shape import shape_from_hf
from trainer.backend.megatron.thd import PackedBatch, to_thd
from trainer.backend.megatron.weights_io import read_hf_tensors, write_hf
from trainer.backend.torch_backend import lr_lambda
from trainer.losses import LossFn, LossInputs
from trainer.packing import MicroBatch, Sample, pack
from trainer.vocab_logprobs import VocabSlice, packed_logprobs

__all__ = ["LocalOptimizer", "MegatronEngine", "StepTotals", "idle_micro_batch", "merge_step_reports"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """megatron-core warns about missing Apex/TE and deprecated defaults while building; none apply here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class StepTotals:
    """Normalisers of a whole step (every rank sees the same)."""

    tokens: float
    seqs: float


@dataclass
class _Item:
    mb: MicroBatch
    ids: torch.Tensor
    packed: PackedBatch


def idle_micro_batch() -> MicroBatch:
    """Two untrained tokens: what a DP rank without a micro-batch of its own forwards (zero gradient)."""
    zeros = np.zeros(2, dtype=np.float32)
    return pack([Sample(tokens=np.zeros(2, dtype=np.int64), mask=zeros, behaviour_logprobs=zeros)])


def _trained_seqs(mb: MicroBatch) -> int:
    per_seq = torch.zeros(len(mb.seq_lens)).index_add(0, mb.seq_index, mb.mask.float())
    return int((per_seq > 0).sum())


def merge_step_reports(reports: Sequence[dict[str, Any] | None], totals: StepTotals) -> StepResult:
    """One :class:`StepResult` from the per-rank reports of a step (None from ranks that do not report)."""
    metrics: dict[str, float] = {}
    diff_sum, diff_max, tokens, grad_norm, lr = 0.0, 0.0, 0, 0.0, 0.0
    for r in reports:
        if r is None:
            continue
        for k, v in r["metrics"].items():
            metrics[k] = metrics.get(k, 0.0) + v
        diff_sum += r["diff_sum"]
        diff_max = max(diff_max, r["diff_max"])
        tokens += r["tokens"]
        grad_norm, lr = r["grad_norm"], r["lr"]
    return StepResult(metrics=metrics, grad_norm=grad_norm, lr=lr, tokens=tokens,
                      logprob_diff_mean=diff_sum / totals.tokens, logprob_diff_max=diff_max)


def _finalize_grads(model: list[Any], num_tokens: Any = None, **kwargs: Any) -> None:
    """megatron's grad finalisation (DP all-reduce, SP norms, tied embeddings) without per-token scaling."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, num_tokens=None, **kwargs)


class LocalOptimizer:
    """torch AdamW with global-norm clipping, for a single CPU rank (megatron-core's optimizer needs CUDA)."""

    def __init__(self, model: torch.nn.Module, o: Any) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = o.grad_clip if o.grad_clip is not None else float("inf")
        self.inner = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.param_groups = self.inner.param_groups

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def step(self) -> tuple[bool, float, None]:
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        self.inner.step()
        return True, norm, None

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class MegatronEngine:
    """This rank's model stage (wrapped for DDP) and optimizer, loaded from the HF checkpoint ``lc.model``."""

    def __init__(self, rank: Rank, lc: LearnerConfig) -> None:
        self.rank, self.lc = rank, lc
        self.on_gpu = rank.device.type == "cuda"
        if not self.on_gpu and rank.pp > 1:
            raise ConfigError("config key learner.megatron.pipeline_parallel: > 1 needs CUDA (megatron-core's "
                              "pipeline schedules allocate on the GPU)")
        if lc.loss.kl_coef > 0 and rank.pp > 1:
            raise ConfigError("config key learner.loss.kl_coef: the megatron backend's KL reference model needs "
                              "pipeline_parallel = 1")
        self.base = Path(lc.model)
        self.hf_config = AutoConfig.from_pretrained(self.base)
        self.shape = shape_from_hf(self.hf_config)
        self.bf16 = lc.dtype == "bfloat16" or (lc.dtype == "auto" and rank.device.type == "cuda")
        mc = lc.megatron
        self.opts = ModelOptions(tp=rank.tp, pp=rank.pp, sequence_parallel=mc.sequence_parallel, bf16=self.bf16,
                                 kernel=resolve_kernel(mc.attention, rank.device), recompute=lc.gradient_checkpointing,
                                 fused_rope=lc.fused_kernels and self.on_gpu,
                                 fused_swiglu=lc.fused_kernels and self.on_gpu,
                                 cpu=rank.device.type == "cpu")
        per_rank = padded_vocab(self.shape, rank.tp) // rank.tp
        start = rank.tp_rank * per_rank
        from megatron.core import parallel_state as ps

        self.vocab = VocabSlice(start, min(per_rank, self.shape.vocab - start), ps.get_tensor_model_parallel_group(),
                                fused=lc.fused_kernels and self.on_gpu)
        local = shard(hf_to_megatron(read_hf_tensors(self.base), self.shape), self.shape, tp=rank.tp,
                      tp_rank=rank.tp_rank, pp=rank.pp, pp_rank=rank.pp_rank)
        self.model = self._build_model(local)
        self.ref = self._build_reference(local) if lc.loss.kl_coef > 0 else None
        self.optimizer = self._build_optimizer()
        self.lr_factor = lr_lambda(lc.optim)
        self.step = 0

    # ------------------------------------------------------------------ building

    def _build_gpt(self, local: dict[str, torch.Tensor]) -> Any:
        with _quiet():
            gpt = build_gpt(self.shape, self.opts, pre_process=self.rank.first_stage, post_process=self.rank.last_stage)
        self._load_local(gpt, local)
        return gpt.to(self.rank.device)

    def _build_reference(self, local: dict[str, torch.Tensor]) -> Any:
        """A frozen copy of the initial weights: the KL term's reference policy."""
        ref = self._build_gpt(local)
        ref.eval().requires_grad_(False)
        return ref

    def _build_model(self, local: dict[str, torch.Tensor]) -> Any:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        gpt = self._build_gpt(local)
        if not self.on_gpu:
            return gpt
        gpt.config.finalize_model_grads_func = _finalize_grads
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.lc.megatron.distributed_optimizer)
        with _quiet():
            return DistributedDataParallel(gpt.config, ddp_cfg, module=gpt)

    @property
    def module(self) -> Any:
        """The ``GPTModel`` stage (inside the DDP wrapper on GPU)."""
        return self.model.module if self.on_gpu else self.model

    def _load_local(self, gpt: Any, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = gpt.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"megatron shard: missing {missing}, unexpected {unexpected}")

    def _build_optimizer(self) -> Any:
        o = self.lc.optim
        if not self.on_gpu:  # megatron-core's optimizers allocate on CUDA; one CPU rank uses torch's AdamW
            return LocalOptimizer(self.model, o)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        cfg = OptimizerConfig(
            optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
            adam_eps=o.eps, clip_grad=o.grad_clip if o.grad_clip is not None else float("inf"), bf16=self.bf16,
            params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            use_distributed_optimizer=self.lc.megatron.distributed_optimizer,
        )
        with _quiet():
            return get_megatron_optimizer(cfg, [self.model])

    # ------------------------------------------------------------------ collectives helpers

    def gather(self, obj: Any) -> list[Any] | None:
        """``obj`` of every rank, on rank 0 (None elsewhere)."""
        if self.rank.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.rank.world if self.rank.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.rank.control)
        return out

    def _item(self, mb: MicroBatch) -> _Item:
        pad = self.rank.tp if self.opts.sequence_parallel and self.rank.tp > 1 else 1
        ids, packed = to_thd(mb, head_dim=self.shape.head_dim, theta=self.shape.rope_theta, pad_to=pad,
                             device=self.rank.device)
        return _Item(mb.to(self.rank.device), ids, packed)

    def _run(self, items: list[_Item], loss: Any, *, forward_only: bool) -> list[Any]:
        """Forward (and backward) every item; the loss callables' reports, on the last pipeline stage."""
        if self.rank.pp > 1:
            return self._run_pipelined(items, loss, forward_only=forward_only)
        reports = []
        for item in items:
            out = self.model(item.ids, None, None, packed_seq_params=item.packed)
            value, _, report = loss(item, out)
            if not forward_only:
                value.backward()
            reports.append(report)
        if not forward_only and self.on_gpu:
            _finalize_grads([self.model])
        return reports

    def _run_pipelined(self, items: list[_Item], loss: Any, *, forward_only: bool) -> list[Any]:
        """megatron-core's 1F1B schedule over the pipeline stages (CUDA only)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data: Iterator[_Item], model: Any) -> tuple[torch.Tensor, Any]:
            item = next(data)
            out = model(item.ids, None, None, packed_seq_params=item.packed)
            return out, functools.partial(loss, item)

        with _quiet():
            out: list[Any] = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(items), model=[self.model], num_microbatches=len(items),
                seq_length=max(i.ids.shape[1] for i in items), micro_batch_size=1, forward_only=forward_only)
        return out

    def _scores(self, item: _Item, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mb = item.mb
        logits = output[0, : mb.num_tokens]
        return packed_logprobs(logits, mb.input_ids[0], mb.position_ids[0] == 0, self.vocab, mb.temperature)

    # ------------------------------------------------------------------ commands

    @torch.no_grad()
    def logprobs(self, mb: MicroBatch) -> torch.Tensor | None:
        """Per-token logprobs ``[T]`` (float32, CPU) of ``mb``, on rank 0."""
        self.model.eval()

        def loss(item: _Item, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
            lp, _ = self._scores(item, output)
            return lp.sum() * 0, torch.tensor(1), lp.float().cpu()

        done = self._run([self._item(mb)], loss, forward_only=True)
        mine = done[0] if done and self.rank.reports and self.rank.dp_rank == 0 else None
        gathered = self.gather(mine)
        return None if gathered is None else next(t for t in gathered if t is not None)

    def train_step(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, cfg: LossConfig) -> StepResult | None:
        """Forward/backward this DP rank's share of ``micro_batches``, then one optimizer step (all ranks)."""
        if not micro_batches:
            raise ValueError("train_step: no micro-batches")
        if not self.on_gpu and self.rank.world > 1:
            raise ConfigError("the megatron backend trains on CPU with one rank only (megatron-core's optimizers "
                              "and gradient buffers need CUDA); several CPU ranks can score and export")
        totals = StepTotals(tokens=max(sum(float(mb.mask.sum()) for mb in micro_batches), 1.0),
                            seqs=max(float(sum(_trained_seqs(mb) for mb in micro_batches)), 1.0))
        share = assign_micro_batches([mb.num_tokens for mb in micro_batches], self.rank.dp)[self.rank.dp_rank]
        mine = [micro_batches[i] for i in share] or [idle_micro_batch()]
        self.model.train()
        if self.on_gpu:
            self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        done = self._run([self._item(mb) for mb in mine], functools.partial(self._loss, loss_fn, cfg, totals),
                         forward_only=False)
        lr = self.lc.optim.lr * self.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, self.lc.optim.weight_decay
        _, grad_norm, _ = self.optimizer.step()
        self.step += 1
        tokens = sum(mb.num_tokens for mb in mine) if share else 0
        report = self._report(done, float(grad_norm or 0.0), lr, tokens)
        gathered = self.gather(report)
        return None if gathered is None else merge_step_reports(gathered, totals)

    def _loss(self, loss_fn: LossFn, cfg: LossConfig, totals: StepTotals, item: _Item,
              output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        mb = item.mb
        lp, ent = self._scores(item, output)
        ref = self._reference_logprobs(item) if cfg.kl_coef > 0 else None
        proximal = (mb.proximal_logprobs if mb.proximal_logprobs is not None else lp.detach()) if cfg.proximal else None
        inputs = LossInputs(
            logprobs=lp, behaviour_logprobs=mb.behaviour_logprobs, advantages=mb.advantages, mask=mb.mask,
            seq_index=mb.seq_index, num_seqs=len(mb.seq_lens), proximal_logprobs=proximal, ref_logprobs=ref, entropy=ent,
            total_tokens=totals.tokens, total_seqs=totals.seqs)
        out = loss_fn(inputs, cfg)
        # kept on the device until the step ends: a host read here would stall the next micro-batch's launch
        gap = (lp.detach() - mb.behaviour_logprobs).abs() * (mb.mask > 0)
        stats = {"metrics": {k: v.detach() for k, v in out.metrics.items()}, "diff_sum": gap.sum(),
                 "diff_max": gap.max() if gap.numel() else gap.new_zeros(())}
        return out.loss, torch.tensor(1), stats

    @torch.no_grad()
    def _reference_logprobs(self, item: _Item) -> torch.Tensor:
        if self.ref is None:
            raise ConfigError("config key learner.loss.kl_coef: > 0 needs a reference model; this learner was "
                              "started with kl_coef = 0 and has none")
        lp, _ = self._scores(item, self.ref(item.ids, None, None, packed_seq_params=item.packed))
        return lp

    def _report(self, done: list[dict[str, Any]], grad_norm: float, lr: float, tokens: int) -> dict[str, Any] | None:
        if not self.rank.reports:
            return None
        metrics: dict[str, Any] = {}
        for d in done:
            for k, v in d["metrics"].items():
                metrics[k] = metrics.get(k, 0.0) + v
        return {"metrics": {k: float(v) for k, v in metrics.items()},
                "diff_sum": float(sum(d["diff_sum"] for d in done)),
                "diff_max": max((float(d["diff_max"]) for d in done), default=0.0), "tokens": tokens,
                "grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------ state

    def _local_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()
                if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}

    def export_hf(self, path: Path) -> None:
        """Gather every (TP, PP) shard to rank 0, which writes the HF checkpoint into ``path``."""
        r = self.rank
        gathered = self.gather(((r.pp_rank, r.tp_rank), self._local_state()) if r.dp_rank == 0 else None)
        if gathered is None:
            return
        shards = dict(g for g in gathered if g is not None)
        hf = megatron_to_hf(merge_shards(shards, self.shape, tp=r.tp, pp=r.pp), self.shape)
        write_hf(hf, self.base, Path(path), torch.bfloat16 if self.bf16 else torch.float32)

    def _suffix(self) -> str:
        return f"tp{self.rank.tp_rank}_pp{self.rank.pp_rank}"

    def save_state(self, path: Path) -> None:
        """Model shard (DP rank 0 of each TP×PP position) and optimizer state of every rank into ``path``."""
        path, r = Path(path), self.rank
        if r.dp_rank == 0:
            torch.save(self._local_state(), path / f"model_{self._suffix()}.pt")
        if self.on_gpu and self.lc.megatron.distributed_optimizer:
            self.optimizer.save_parameter_state(str(path / f"optim_params_{self._suffix()}.pt"))
        if r.dp_rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step},
                       path / f"optim_{self._suffix()}.pt")
        if r.rank == 0:
            (path / "megatron.json").write_text(json.dumps({"tp": r.tp, "pp": r.pp, "dp": r.dp}))
        self.gather(None)  # every rank's files are written before the checkpoint is committed

    def load_state(self, path: Path) -> None:
        """Restore what :meth:`save_state` wrote (same TP and PP sizes)."""
        path, r = Path(path), self.rank
        layout = json.loads((path / "megatron.json").read_text())
        if (layout["tp"], layout["pp"]) != (r.tp, r.pp):
            raise ConfigError(f"checkpoint {path} was written with tensor_parallel={layout['tp']}, "
                              f"pipeline_parallel={layout['pp']}; this learner has {r.tp}, {r.pp}")
        state = torch.load(path / f"model_{self._suffix()}.pt", map_location=r.device, weights_only=True)
        self._load_local(self.module, state)
        opt = torch.load(path / f"optim_{self._suffix()}.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.step = int(opt["step"])
        if self.on_gpu and self.lc.megatron.distributed_optimizer:
            device = _drop_adam_steps(self.optimizer)  # the saved parameter state has no per-parameter step
            self.optimizer.load_parameter_state(str(path / f"optim_params_{self._suffix()}.pt"))
            _restore_adam_steps(self.optimizer, self.step, device)
        self.gather(None)


def _adam_states(optimizer: Any) -> list[dict[str, Any]]:
    inners = [getattr(o, "optimizer", o) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [st for inner in inners for st in getattr(inner, "state", {}).values() if isinstance(st, dict) and st]


def _drop_adam_steps(optimizer: Any) -> torch.device:
    """Take torch Adam's per-parameter ``step`` out of the distributed optimizer's states, which its parameter
    state file does not hold (loading it would look for one); returns the device the steps lived on."""
    device = torch.device("cpu")
    for state in _adam_states(optimizer):
        step = state.pop("step", None)
        if isinstance(step, torch.Tensor):
            device = step.device
    return device


def _restore_adam_steps(optimizer: Any, step: int, device: torch.device) -> None:
    """Give every parameter state the learner's optimizer step count (Adam's bias correction)."""
    for state in _adam_states(optimizer):
        if "step" not in state:
            state["step"] = torch.tensor(float(step), device=device)
