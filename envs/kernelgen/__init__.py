"""Multi-turn Triton kernel generation: problems, sandboxed evaluation, feedback, rewards, the environment.

* :mod:`~envs.kernelgen.problem` — KernelBench-layout problems read from a directory (``problems/`` ships 21);
* :mod:`~envs.kernelgen.harness` / :mod:`~envs.kernelgen.evaluate` — one sandboxed subprocess per evaluation:
  correctness on fresh input sets, anti-hacking rules, CUDA-event timing on GPU;
* :mod:`~envs.kernelgen.feedback` / :mod:`~envs.kernelgen.reward` — what the model reads, what it earns;
* :mod:`~envs.kernelgen.env` — :class:`KernelEnv`, served in-process or by env workers;
* :mod:`~envs.kernelgen.pool` — evaluation slots (one per GPU, faulty GPUs taken out);
* :mod:`~envs.kernelgen.dataset` — a problem directory to task JSONL (``python -m envs.kernelgen.dataset``);
* :mod:`~envs.kernelgen.templates` — generated elementwise problems and SFT demonstrations (CPU warm-up).
"""

from envs.kernelgen.env import KernelEnv

__all__ = ["KernelEnv"]
