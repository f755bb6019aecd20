"""agentrl's embedded inference engine: SGLang's HTTP API over a Hugging Face model.

Start it with ``agentrl engine --model DIR`` (see :mod:`agentrl.commands.engine`). The parts, one job each:

- :mod:`~agentrl.engine.server` — the app and ``/generate``; :mod:`~agentrl.engine.admin_routes` — weights,
  pause, abort, flush, memory release; :mod:`~agentrl.engine.info_routes` — info, load, tokenize;
  :mod:`~agentrl.engine.openai_api` — ``/v1/*``; :mod:`~agentrl.engine.auth` — API / admin keys.
- :mod:`~agentrl.engine.api` / :mod:`~agentrl.engine.generate_in` — request schemas, batching and ``n``,
  validation (HTTP 400 naming the field).
- :mod:`~agentrl.engine.scheduler` — continuous batching (overlapped decode steps), aborts, pause/retract,
  timeouts, weight updates between steps; :mod:`~agentrl.engine.step_inputs` — what a step needs from its requests.
- :mod:`~agentrl.engine.runner` — batched prefill/decode over a paged KV pool (CUDA graphs on GPU);
  :mod:`~agentrl.engine.decode_attention` — the paged decode-attention kernel; :mod:`~agentrl.engine.fused_ops`
  — fused norm, activation and rotary kernels; :mod:`~agentrl.engine.sample_kernel` — the fused sampler.
- :mod:`~agentrl.engine.kv_cache` / :mod:`~agentrl.engine.radix` — pool bookkeeping and the radix prefix cache.
- :mod:`~agentrl.engine.sampling` — per-row sampling, logprobs before truncation, per-request seeds;
  :mod:`~agentrl.engine.logits` — logit bias, penalties, custom processors, grammar masks;
  :mod:`~agentrl.engine.grammar` — constrained decoding (xgrammar); :mod:`~agentrl.engine.custom_processor`.
- :mod:`~agentrl.engine.request` — one request and its SGLang-shaped reply.
- :mod:`~agentrl.engine.weights` / :mod:`~agentrl.engine.bus_weights` / :mod:`~agentrl.engine.tensor_weights`
  — loading models and new weights; :mod:`~agentrl.engine.memory` — releasing memory (colocated mode).
- :mod:`~agentrl.engine.tiny` — random-init models with a locally trained tokenizer (``agentrl model init``).

Modules are imported on demand (torch and transformers are heavy); nothing is re-exported here.
"""
