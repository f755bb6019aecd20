"""Config of the learner (``agentrl learner`` / ``agentrl sft``): what to train, on what, and how.

Extension points (advantage, loss, group filter) are named by dotted path
(``"trainer.advantages.grpo"``) and resolved when the learner starts; see the
README's extension-point table for their signatures.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agentrl.config.loader import Section
from agentrl.config.megatron import MegatronConfig

__all__ = ["Aggregation", "BatchConfig", "LearnerConfig", "LossConfig", "OptimConfig", "WeightGroupConfig"]

Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


class LossConfig(Section):
    """The policy loss: PPO-style clipping, off-policy correction, KL and entropy terms."""

    fn: str = "trainer.losses.ppo_loss"
    """dotted path of a LossFn (trainer.losses.sft_loss for warm-up)"""
    clip_low: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    """ratio clipped below at 1 - clip_low"""
    clip_high: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    """ratio clipped above at 1 + clip_high (0.28 = DAPO's clip-higher)"""
    dual_clip: Annotated[float, msgspec.Meta(gt=1)] | None = None
    """cap on -A·ratio for A < 0 (e.g. 3.0)"""
    ratio_level: Literal["token", "sequence"] = "token"
    """importance ratio per token, or per sequence (GSPO's length-normalised sequence ratio)"""
    proximal: bool = True
    """Decoupled PPO: ratio against proximal logprobs (the pre-update weights, recomputed by the learner) and
    a detached behaviour weight exp(proximal - behaviour). Off: ratio against the engine's behaviour logprobs."""
    behaviour_correction: Literal["none", "truncate", "mask", "off"] = "truncate"
    """What to do with the behaviour weight: "none" keeps it, "truncate" = TIS min(w, is_cap), "mask" zeroes
    tokens with w > is_cap (AReaL's cap), "off" uses weight 1."""
    is_cap: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    """cap on the behaviour importance weight (truncate and mask corrections)"""
    kl_coef: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """weight of KL(policy || frozen reference); 0 = no reference"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """estimator of KL(policy || reference): k1, k2 or k3 (Schulman's)"""
    entropy_coef: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """entropy bonus (subtracted from the loss)"""
    aggregation: Aggregation = "token-mean"
    """how token losses are averaged: over all tokens, or per sequence then over sequences"""


class OptimConfig(Section):
    """AdamW with linear warm-up then constant or cosine decay; global-norm gradient clipping."""

    lr: Annotated[float, msgspec.Meta(gt=0)] = 1e-6
    """peak learning rate (reached after warmup_steps)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    eps: Annotated[float, msgspec.Meta(gt=0)] = 1e-8
    """AdamW epsilon"""
    weight_decay: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """AdamW decoupled weight decay"""
    warmup_steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    """optimizer steps of linear warm-up from 0 to lr"""
    schedule: Literal["constant", "cosine"] = "constant"
    """learning rate after warm-up: constant, or cosine decay to min_lr_ratio * lr over total_steps"""
    total_steps: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """horizon of the cosine schedule (agentrl sft: its own steps)"""
    min_lr_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """floor of the cosine schedule, as a fraction of lr"""
    grad_clip: Annotated[float, msgspec.Meta(gt=0)] | None = 1.0
    """global gradient-norm clip; None = no clipping"""


class BatchConfig(Section):
    """How trajectories become training batches."""

    max_tokens_per_micro_batch: Annotated[int, msgspec.Meta(ge=1)] = 8192
    """packing budget (one sequence may exceed it alone)"""
    incomplete_group: Literal["wait", "drop", "partial"] = "wait"
    """after group_timeout_s: drop or train what came"""
    group_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    """seconds an incomplete group is waited for before incomplete_group applies"""
    fetch_batch: Annotated[int, msgspec.Meta(ge=1)] = 64
    """messages pulled from the bus per fetch"""
    ack_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Trajectories stay unacked until their step commits; the learner marks them in progress every ack_wait_s
    / 3 seconds. After a crash, what it held is redelivered to the restarted learner after this long (a restart
    takes about as long: the model is loaded and the checkpoint restored meanwhile)."""


class WeightGroupConfig(Section):
    """The torch.distributed group the learner broadcasts new weights over (``learner.weight_sync:
    distributed``): the learner is rank 0 and serves the rendezvous; every engine of ``controller.engines`` that
    answers joins (SGLang's /init_weights_update_group), and the controller tells them when to receive."""

    address: str = "127.0.0.1"
    """address the engines reach the learner at (the rendezvous server, and the interface the group binds)"""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    """rendezvous port on the learner; 0 = a free port picked at start"""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: nccl when the learner trains on a GPU (engines on GPUs), else gloo"""
    group_name: str = "agentrl-weights"
    """prefix of the group names; each group formed adds -<learner id>-<n>"""
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """bound on forming a group and on one broadcast; an engine that misses it loads that version from disk"""


class LearnerConfig(Section):
    """The learner actor: model, algorithm, batching, optimizer, outputs."""

    model: str = ""
    """Hugging Face model directory (config.json + safetensors) to start from"""
    backend: Literal["torch", "megatron"] = "torch"
    """torch (one process) or megatron (megatron-core, sized by learner.megatron)"""
    megatron: MegatronConfig = msgspec.field(default_factory=MegatronConfig)
    """parallel layout of the megatron backend"""
    device: str = "auto"
    """auto = cuda if available, else cpu"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = bf16 on GPU, float32 on CPU"""
    precision: Literal["auto", "autocast", "bf16_master"] = "auto"
    """How the torch backend computes in bf16 (learner.dtype bf16). bf16_master: bf16 parameters, float32 master
    weights and AdamW state, gradients summed over micro-batches in float32; autocast: float32 parameters under
    bf16 autocast (casts every weight at each use). auto = bf16_master on a GPU, else autocast. In float32,
    auto and autocast change nothing and bf16_master is an error; the megatron backend always keeps masters."""
    fused_kernels: bool = True
    """on GPU: per-token logprobs and entropy through compiled fused kernels, in row chunks, never a float32
    [tokens, vocab] tensor; RMSNorm and SwiGLU (torch backend) or RoPE and SwiGLU (megatron backend) fused too
    (torch.compile); false = plain PyTorch ops"""
    attn_implementation: str = "sdpa_varlen"
    """sdpa_varlen: per-sequence causal SDPA on packed rows (trainer/backend/varlen.py); sdpa | eager build a
    block-diagonal mask from the position ids; flash_attention_2 uses its varlen kernels (needs flash-attn)."""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, slower)"""
    advantage: str = "trainer.advantages.grpo"
    """dotted path of an AdvantageFn"""
    minibatches: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Optimizer steps per batch (PPO mini-batches). Above 1, proximal logprobs are scored with the weights
    from before the batch's first step, so later steps are corrected by the decoupled-PPO ratio and clipped."""
    loss: LossConfig = msgspec.field(default_factory=LossConfig)
    """the policy loss"""
    optim: OptimConfig = msgspec.field(default_factory=OptimConfig)
    """the optimizer and its learning-rate schedule"""
    batch: BatchConfig = msgspec.field(default_factory=BatchConfig)
    """how trajectories become training batches"""
    weights_dir: str = "{run_dir}/weights"
    """v<version>/ in HF layout, one per published version"""
    keep_weights: Annotated[int, msgspec.Meta(ge=1)] = 3
    """published versions kept on disk"""
    overlap_publish: bool = False
    """Write and announce each version in the background while the learner waits for its next batch (the next
    step trains only once it is out: it changes the parameters being written, and checkpoints wait for it too).
    Hides the publish (~0.9 s a version at 0.5B on an H100) behind the learner's wait; a run the engines bound
    gains nothing (bench/RESULTS.md, Async speedup: 0.92x there). The learner's version then
    runs one ahead of the engines' while a version is written, so more tokens can reach the staleness bound
    (masked or dropped past it, as always). No gain with max_staleness 0: the next batch needs the new weights."""
    publish_to_object_store: bool = False
    """also put the safetensors into the bus object store"""
    weight_sync: Literal["disk", "distributed"] = "disk"
    """How engines get new weights. disk: each version is written to weights_dir and the controller tells every
    engine to load it. distributed: the learner also broadcasts each version over torch.distributed
    (learner.weight_group) to the engines of controller.engines, which the controller tells to receive it;
    engines outside the group (restarted, unreachable) and failed transfers still load from disk."""
    weight_group: WeightGroupConfig = msgspec.field(default_factory=WeightGroupConfig)
    """the torch.distributed group of weight_sync: distributed"""
    colocate: bool = False
    """Colocated mode (slime's --colocate): the learner shares one device with the run's engines. Around each
    training step the engines retract their running requests and release their KV pool, weights and CUDA graphs
    (/release_memory_occupation), the learner moves its model and optimizer states onto the device, trains,
    moves them back to host memory and empties the CUDA cache, and the engines take their memory back and
    continue; new weights reach them as usual (published, loaded by the controller). Generation stops during
    each step. Needs engines this run starts on the learner's device (the embedded engine, or SGLang with
    --enable-memory-saver), the local launcher and the torch backend; agentrl run refuses anything else."""
    colocate_load_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """learner.colocate: before releasing the engines for a step, wait at most this long for them to serve the
    last published version (a load the release interrupts fails, and the controller's reconcile loop loads it
    again after the step); the wait ends as soon as they do"""
    checkpoint_dir: str = "{run_dir}/checkpoints"
    """learner checkpoints (model, optimizer, RNG, consumed trajectory ids)"""
    keep_checkpoints: Annotated[int, msgspec.Meta(ge=1)] = 2
    """checkpoints kept on disk"""
    checkpoint_every: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Checkpoint (and only then ack) every this many steps. Trajectories of steps after the last checkpoint
    stay unacked, so a crash retrains them from that checkpoint: still exactly once among committed steps."""
    final_dir: str = "{run_dir}/final"
    """HF checkpoint exported when the learner stops"""
    metrics_file: str = "{run_dir}/learner_metrics.jsonl"
    """JSONL file of per-step learner metrics"""
    torch_threads: Annotated[int, msgspec.Meta(ge=0)] = 0
    """CPU threads of torch; 0 = torch default"""
    sft_data: str = ""
    """`agentrl sft`: JSONL, one {"messages": [...]} per line"""
    sft_epochs: Annotated[int, msgspec.Meta(ge=1)] = 1
    """agentrl sft: passes over sft_data"""
    sft_batch_size: Annotated[int, msgspec.Meta(ge=1)] = 8
    """agentrl sft: conversations per optimizer step"""
    sft_output: str = "{run_dir}/sft"
    """`agentrl sft`: final HF checkpoint directory"""

    def path(self, template: str, run_dir: str) -> str:
        """Fill ``{run_dir}`` in one of the path fields."""
        return template.format(run_dir=run_dir)
