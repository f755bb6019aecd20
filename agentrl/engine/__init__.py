"""agentrl's embedded inference engine: SGLang's HTTP API over a Hugging Face model.

Start it with ``agentrl engine --model DIR`` (see :mod:`agentrl.commands.engine`). The parts, one job each:

- :mod:`~agentrl.engine.server` — aiohttp routes of SGLang's native API (``/generate``, abort, pause,
  weight updates, info); :mod:`~agentrl.engine.openai_api` — ``/v1/*``; :mod:`~agentrl.engine.api` —
  request schemas and validation (HTTP 400 naming the field).
- :mod:`~agentrl.engine.scheduler` — continuous batching, aborts, pause, weight updates between steps.
- :mod:`~agentrl.engine.runner` — batched prefill/decode over a KV cache allocated once (CUDA graphs on GPU).
- :mod:`~agentrl.engine.sampling` — per-row sampling, logprobs before truncation, per-request seeds.
- :mod:`~agentrl.engine.slots` — KV slots and prefix reuse; :mod:`~agentrl.engine.request` — one request.
- :mod:`~agentrl.engine.weights` / :mod:`~agentrl.engine.bus_weights` — loading models and new weights.
- :mod:`~agentrl.engine.tiny` — random-init models with a locally trained tokenizer (``agentrl model init``).

Modules are imported on demand (torch and transformers are heavy); nothing is re-exported here.
"""
