"""The PyTorch backend: one Hugging Face causal LM in one process, on CPU or one GPU.

Packed micro-batches are forwarded as one row with per-sequence position ids and no attention mask. With
``attn_implementation="sdpa_varlen"`` (the default, :mod:`trainer.backend.varlen`) each sequence gets its own
causal SDPA; with ``sdpa``/``eager`` transformers builds a block-diagonal mask from the position ids, and
``flash_attention_2`` uses its varlen kernels. Either way attention stays within each sequence.

Precision (``learner.dtype`` and ``learner.precision``): float32 throughout; or bf16 compute, either with float32
parameters under bf16 autocast (``autocast``: every use of a weight casts it to bf16 again, forward and
backward), or with bf16 parameters and float32 master weights in the optimizer (``bf16_master``, the default
in bf16 on a GPU; :mod:`trainer.backend.master`: gradients summed over micro-batches in float32, clipped and
stepped in float32, rounded back into the bf16 parameters). Logprobs are computed in float32 either way. The
optimizer is AdamW with linear warm-up then constant or cosine decay.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from agentrl.config.learner import LearnerConfig, LossConfig, OptimConfig
from agentrl.errors import ConfigError
from trainer.backend.base import StepResult
from trainer.backend.compiled_layers import compile_layers
from trainer.backend.host_stash import HostStash
from trainer.backend.master import MasterWeights
from trainer.backend.varlen import VARLEN
from trainer.losses import LossFn, LossInputs
from trainer.packing import MicroBatch, token_logprobs
from trainer.vocab_logprobs import VocabSlice, packed_logprobs

__all__ = ["TorchBackend", "build_torch_backend", "lr_lambda", "resolve_device", "resolve_precision"]


def resolve_device(name: str) -> torch.device:
    """``auto`` = the first GPU if there is one, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_lambda(cfg: OptimConfig) -> Any:
    """LR multiplier per step: linear warm-up to 1, then constant or cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class TorchBackend:
    """Train ``model`` in place; ``ref_model`` (frozen) scores the KL reference when the loss asks for one.

    ``bf16`` computes in bf16: under autocast over the model's own (float32) parameters, or, with
    ``master_weights``, with the parameters of both models cast to bf16 (buffers such as RoPE frequencies keep
    their dtype) and the optimizer stepping float32 masters seeded from the values before the cast.
    ``master_weights`` without ``bf16`` is a ValueError.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        optim: OptimConfig,
        *,
        device: torch.device | str = "cpu",
        bf16: bool = False,
        gradient_checkpointing: bool = False,
        ref_model: PreTrainedModel | None = None,
        track_entropy: bool = True,
        offloaded: bool = False,
        fused_logprobs: bool = False,
        master_weights: bool = False,
        compiled_layers: bool = False,
    ) -> None:
        if master_weights and not bf16:
            raise ValueError("TorchBackend: master_weights needs bf16 (float32 parameters need no masters)")
        self.device = torch.device(device)
        # where the states are now: the device, or host memory between colocated steps (see offload)
        self.location = torch.device("cpu") if offloaded else self.device
        self.stash = HostStash()  # pinned host copies of the states between colocated steps (see offload)
        self.model = model
        self.model.to(self.location)  # type: ignore[arg-type]  # transformers' wrapped .to() is mistyped
        self.model.config.use_cache = False
        if gradient_checkpointing:
            _enable_checkpointing(self.model)
        self.ref_model = ref_model
        if compiled_layers:  # RMSNorm and SwiGLU as fused kernels (trainer.backend.compiled_layers)
            for m in (self.model, ref_model):
                if m is not None:
                    compile_layers(m)
        if ref_model is not None:
            ref_model.to(self.location)  # type: ignore[arg-type]
            ref_model.eval().requires_grad_(False)
        self.bf16 = bf16
        self.track_entropy = track_entropy  # the entropy metric costs a pass over [tokens, vocab]
        self.fused_logprobs = fused_logprobs  # trainer.vocab_logprobs's compiled chunks (GPU)
        self.optim_cfg = optim
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]  # tied weights once
        self.trainable_names = [n for n, _ in named]
        self._trainable = [p for _, p in named]  # the same objects wherever the states move (see _move)
        self.master = _bf16_with_masters(self.model, self._trainable, ref_model) if master_weights else None
        self.optimizer = torch.optim.AdamW(
            self._stepped(), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim))

    def _stepped(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: the float32 masters, or the trainable parameters themselves."""
        return self.master.masters if self.master is not None else self._trainable

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    # ------------------------------------------------------------------ forward

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.bf16 and self.master is None:  # with masters the parameters already are bf16
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def _forward(
        self, model: PreTrainedModel, mb: MicroBatch, *, with_entropy: bool = False, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        extra = {"packed_seq_lens": mb.seq_lens} if model.config._attn_implementation == VARLEN else {}
        with self._autocast():
            out = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, **extra)
        starts = mb.position_ids[0] == 0
        logits = out.logits[0]
        if self.fused_logprobs:  # the same values; the entropy has a gradient only if a loss uses it
            lp, ent = packed_logprobs(logits, mb.input_ids[0], starts, VocabSlice(0, logits.shape[-1], fused=True),
                                      mb.temperature)
            return lp, (ent if entropy_grad else ent.detach()) if with_entropy else None
        return token_logprobs(logits, mb.input_ids[0], starts, with_entropy=with_entropy,
                              entropy_grad=entropy_grad, temperature=mb.temperature)

    @torch.no_grad()
    def logprobs(self, mb: MicroBatch) -> torch.Tensor:
        self.onload()
        self.model.eval()
        lp, _ = self._forward(self.model, mb.to(self.device))
        return lp.float().cpu()

    # ------------------------------------------------------------------ train

    def train_step(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, cfg: LossConfig) -> StepResult:
        """One optimizer step over all micro-batches; losses are normalised over the whole step.

        Decoupled PPO's proximal policy is the pre-update weights. A micro-batch carrying
        ``proximal_logprobs`` (scored before the batch's first update) uses them; otherwise this is the batch's
        only optimizer step, its weights *are* the pre-update ones, and the detached current logprobs are used.
        """
        if not micro_batches:
            raise ValueError("train_step: no micro-batches")
        self.onload()
        self.model.train()
        total_tokens = max(sum(float(mb.mask.sum()) for mb in micro_batches), 1.0)
        total_seqs = max(float(sum(_trained_seqs(mb) for mb in micro_batches)), 1.0)
        sums: dict[str, float] = defaultdict(float)
        diff_sum, diff_max, tokens = 0.0, 0.0, 0
        for cpu_mb in micro_batches:
            mb = cpu_mb.to(self.device)
            inputs = self._loss_inputs(mb, cfg, total_tokens, total_seqs)
            out = loss_fn(inputs, cfg)
            out.loss.backward()
            for key, value in out.metrics.items():
                sums[key] += float(value)
            gap = (inputs.logprobs.detach() - mb.behaviour_logprobs).abs()[mb.mask > 0]
            if gap.numel():
                diff_sum += float(gap.sum())
                diff_max = max(diff_max, float(gap.max()))
            tokens += mb.num_tokens
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step uses (the scheduler advances after it)
        grad_norm = self._clip_and_step()
        return StepResult(
            metrics=dict(sums), grad_norm=grad_norm, lr=lr, tokens=tokens,
            logprob_diff_mean=diff_sum / total_tokens, logprob_diff_max=diff_max,
        )

    def _loss_inputs(self, mb: MicroBatch, cfg: LossConfig, total_tokens: float, total_seqs: float) -> LossInputs:
        with_entropy = self.track_entropy or cfg.entropy_coef > 0
        lp, ent = self._forward(self.model, mb, with_entropy=with_entropy, entropy_grad=cfg.entropy_coef > 0)
        ref = None
        if cfg.kl_coef > 0 and self.ref_model is None:
            raise ConfigError("config key learner.loss.kl_coef: > 0 needs a reference model; this backend has none")
        if cfg.kl_coef > 0 and self.ref_model is not None:
            with torch.no_grad():
                ref, _ = self._forward(self.ref_model, mb)
        return LossInputs(
            logprobs=lp, behaviour_logprobs=mb.behaviour_logprobs, advantages=mb.advantages, mask=mb.mask,
            seq_index=mb.seq_index, num_seqs=len(mb.seq_lens),
            proximal_logprobs=_proximal(mb, lp) if cfg.proximal else None, ref_logprobs=ref, entropy=ent,
            total_tokens=total_tokens, total_seqs=total_seqs,
        )

    def _clip_and_step(self) -> float:
        limit = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._stepped(), limit))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.publish()
        return grad_norm

    # ------------------------------------------------------------------ colocation

    def offload(self) -> None:
        """Move the model, the reference model and the optimizer states to host memory and hand the freed
        memory back to the device (``learner.colocate``: the engines take it between steps). No-op on CPU."""
        self._move(torch.device("cpu"))

    def onload(self) -> None:
        """Bring back onto the device what :meth:`offload` moved (training and scoring do it themselves)."""
        self._move(self.device)

    def _move(self, where: torch.device) -> None:
        """Every state onto ``where`` through the pinned host stash (asynchronous copies, one wait). Parameters and
        masters keep their identity (``.data`` is swapped): they are the optimizer's keys."""
        if where == self.location:
            return
        stash = self.stash
        for tag, model in (("model", self.model), ("ref", self.ref_model)):
            if model is None:
                continue
            for name, param in model.named_parameters():
                param.data = stash.move(f"{tag}.{name}", param.data, where)
                if param.grad is not None:
                    param.grad = stash.move(f"{tag}.{name}.grad", param.grad, where)
            model.to(where)  # type: ignore[arg-type]  # the buffers (small); the parameters are there already
        for i, master in enumerate(self.master.masters if self.master is not None else []):
            master.data = stash.move(f"master.{i}", master.data, where)
        for g, group in enumerate(self.optimizer.param_groups):
            for i, param in enumerate(group["params"]):
                state = self.optimizer.state.get(param, {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:  # scalar step counters stay put
                        state[key] = stash.move(f"optim.{g}.{i}.{key}", value, where)
        stash.wait(self.device)
        self.location = where
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ state

    def save_state(self, path: Path) -> None:
        """``model.safetensors`` (the model as it computes), ``master.safetensors`` (with master weights: the
        float32 masters under the parameters' names), ``optim.pt`` (AdamW and LR schedule)."""
        save_file(_contiguous(self.model.state_dict()), str(path / "model.safetensors"))
        if self.master is not None:
            masters = {n: m.detach() for n, m in zip(self.trainable_names, self.master.masters, strict=True)}
            save_file(masters, str(path / MASTER_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   path / "optim.pt")

    def load_state(self, path: Path) -> None:
        """Restore :meth:`save_state`'s files, from either precision: float32 values (masters, or a float32
        model) take precedence, so a checkpoint moves between ``autocast`` and ``bf16_master`` without loss."""
        state = load_file(str(path / "model.safetensors"), device=str(self.location))
        if (path / MASTER_FILE).exists():
            state.update(load_file(str(path / MASTER_FILE), device=str(self.location)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise ValueError(f"checkpoint {path}: missing keys {missing}, unexpected keys {unexpected}")
        if missing:
            self.model.tie_weights()
        if self.master is not None:
            self.master.load([state[n] for n in self.trainable_names])
        opt = torch.load(path / "optim.pt", map_location=self.location, weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])

    def export_hf(self, path: Path) -> None:
        """The model in HF layout, in the dtype it computes in: bfloat16 with master weights (the masters
        rounded: what the engines are sent too), else float32."""
        self.model.save_pretrained(str(path))


MASTER_FILE = "master.safetensors"


def _bf16_with_masters(
    model: PreTrainedModel, trainable: list[torch.nn.Parameter], ref_model: PreTrainedModel | None
) -> MasterWeights:
    """Cast the parameters of ``model`` (and ``ref_model``) to bf16; masters keep the float32 values."""
    initial = [p.detach().to(torch.float32, copy=True) for p in trainable]
    for m in (model, ref_model):
        if m is not None:
            _cast_parameters(m, torch.bfloat16)
    return MasterWeights(trainable, initial)


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters only: ``model.to(dtype)`` would also round buffers such as RoPE's inverse frequencies."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing of every decoder layer (transformers >= 5.2x renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _proximal(mb: MicroBatch, logprobs: torch.Tensor) -> torch.Tensor:
    return mb.proximal_logprobs if mb.proximal_logprobs is not None else logprobs.detach()


def _trained_seqs(mb: MicroBatch) -> int:
    per_seq = torch.zeros(len(mb.seq_lens)).index_add(0, mb.seq_index, mb.mask.float())
    return int((per_seq > 0).sum())


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Safetensors refuses shared storage (tied embeddings): keep the first name of each shared tensor."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def build_torch_backend(cfg: LearnerConfig) -> TorchBackend:
    """Load ``cfg.model`` (HF directory) and build the backend; a frozen copy is loaded when ``kl_coef > 0``."""
    if not cfg.model:
        raise ConfigError("config key learner.model: empty; expected a Hugging Face model directory")
    device = resolve_device(cfg.device)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    masters = resolve_precision(cfg, device, bf16) == "bf16_master"

    def load() -> PreTrainedModel:
        try:
            return AutoModelForCausalLM.from_pretrained(
                cfg.model, dtype=torch.float32, attn_implementation=cfg.attn_implementation
            )
        except OSError as exc:
            raise ConfigError(f"config key learner.model: cannot load {cfg.model!r}: {exc}") from exc

    ref = load() if cfg.loss.kl_coef > 0 else None
    return TorchBackend(  # colocated: the states wait in host memory until the first step (the engines hold the device)
        load(), cfg.optim, device=device, bf16=bf16, gradient_checkpointing=cfg.gradient_checkpointing, ref_model=ref,
        offloaded=cfg.colocate, fused_logprobs=cfg.fused_kernels and device.type == "cuda", master_weights=masters,
        compiled_layers=cfg.fused_kernels and device.type == "cuda",
    )


def resolve_precision(cfg: LearnerConfig, device: torch.device, bf16: bool) -> str:
    """``learner.precision`` for a run on ``device``: ``float32`` when not computing in bf16 (``autocast`` or
    ``auto`` are then moot; ``bf16_master`` is a ConfigError), ``auto`` = ``bf16_master`` on a GPU."""
    if not bf16:
        if cfg.precision == "bf16_master":
            raise ConfigError(f"config key learner.precision: bf16_master needs bf16; learner.dtype {cfg.dtype!r} "
                              f"is float32 on {device.type}")
        return "float32"
    if cfg.precision == "auto":
        return "bf16_master" if device.type == "cuda" else "autocast"
    return cfg.precision
