"""The Megatron-core learner backend: a ``GPTModel`` (local spec, our packed attention) behind ``TrainBackend``.

Modules: :mod:`.shape` (HF config → architecture), :mod:`.convert` (HF ↔ Megatron weights and TP/PP shards),
:mod:`.thd` (packed THD batches), :mod:`.attention` (RoPE + varlen core attention; the vocab-parallel
logprobs/entropy are :mod:`trainer.vocab_logprobs`, shared with the torch backend), :mod:`.model` (building the model), :mod:`.parallel` (ranks and groups),
:mod:`.schedule` (micro-batches per DP rank), :mod:`.engine` (one rank), :mod:`.driver` (rank 0 leads the
others), :mod:`.launch` (starting the ranks). Importing this package does not import megatron-core.
"""
