"""The evaluation harness: runs inside one sandbox subprocess per evaluation, never in the env worker.

:mod:`envs.kernelgen.evaluate` sends this file's source plus ``main(payload)`` to
:func:`envs.sandbox.run_python`. It imports only the standard library at the top: torch and triton are
imported inside :func:`evaluate`, after the sandbox has set the environment (``TRITON_INTERPRET``,
``CUDA_VISIBLE_DEVICES``, thread counts) and :func:`main` has put the cache directories in the scratch dir.

What it does, in stages (each announced on the result channel, so a crash can be placed):

1. ``setup``: import torch/triton, check the device works, load the reference; a failure here is the
   harness's or the machine's, never the solution's.
2. ``import`` / ``init``: import the solution, build ``Model`` and ``ModelNew`` from the same init inputs
   and seed, then copy the reference's weights into every ``ModelNew`` parameter of the same name and shape.
3. ``run`` / ``check``: for each of N fresh input sets, run ``ModelNew`` first (watched: Triton launches,
   torch ops, streams, threads, memory introspection, calls into the reference), then check its inputs
   were not mutated, its outputs do not alias inputs or earlier outputs, and compare against ``Model``
   (shape, dtype, NaN/Inf, tolerances). The reference runs after the solution, so no reference output
   exists while the solution runs.
4. ``timing`` (CUDA only): CUDA events around warmed-up calls on the current stream, synchronised, median
   of the repetitions; for the solution, eager ``Model`` and ``torch.compile(Model)``.

The result is one JSON line tagged with the run's nonce on a duplicate of the original stdout; the
solution's own stdout is redirected to stderr. The solution runs in this process, so a determined
adversary could tamper with the harness itself (this is the same trust model as KernelBench); the
checks catch the known reward hacks, and the sandbox contains what the code can reach.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import importlib.util
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

RESULT_TAG = "KERNELGEN-RESULT"
STAGE_TAG = "KERNELGEN-STAGE"
ALLOWED_OPS = frozenset(
    ["empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "zero", "fill", "arange", "scalar_tensor", "lift_fresh", "lift_fresh_copy", "view", "unsafe_view", "reshape", "as_strided", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "select", "slice", "alias", "detach", "clone", "copy", "to_copy", "to", "contiguous", "reshape_alias", "unbind", "split", "split_with_sizes", "sym_size", "sym_numel", "sym_stride", "is_same_size", "resize", "set", "item", "local_scalar_dense"]
)


def op_name(func: Any) -> str:
    """The base name of an aten op: ``aten.add_.Tensor`` -> ``add``, ``aten._softmax`` -> ``softmax``."""
    packet = getattr(func, "overloadpacket", func)
    name = str(getattr(packet, "__name__", func)).split(".")[-1]
    return name.strip("_")


class Watch:
    """What the solution did while it ran: state shared by every hook the harness installs."""

    def __init__(self) -> None:
        self.active = False  # the solution's forward is running
        self.solution = False  # solution code is running (import, init, forward)
        self.paused = 0  # inside a Triton launch: the launcher's own torch calls are not the solution's
        self.launches = 0
        self.ops: set[str] = set()
        self.violations: dict[str, str] = {}

    def flag(self, rule: str, detail: str) -> None:
        self.violations.setdefault(rule, detail)

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.active, self.solution, self.launches, self.ops = True, True, 0, set()
        try:
            yield
        finally:
            self.active = self.solution = False


WATCH = Watch()


# ---------------------------------------------------------------- hooks


def _install_hooks(torch: Any, reference_model: Any) -> Any:
    """Wrap Triton launches, memory introspection, threads, CUDA streams and the reference's forward;
    return the torch dispatch mode that records aten ops."""
    _hook_triton_launches()
    _hook_introspection()
    _hook_threads()
    _hook_streams(torch)
    original = reference_model.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if WATCH.active:
            WATCH.flag("reference_call", "ModelNew.forward called the reference Model")
        return original(self, *args, **kwargs)

    reference_model.forward = forward
    return _op_recorder(torch)


def _hook_triton_launches() -> None:
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - very old triton
        pass
    for cls in classes:
        cls.run = _counted_launch(cls.run)


def _counted_launch(run: Callable[..., Any]) -> Callable[..., Any]:
    def launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if WATCH.active and not kwargs.get("warmup", False):
            WATCH.launches += 1
        WATCH.paused += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            WATCH.paused -= 1

    return launch


def _hook_introspection() -> None:
    """Reading the reference's tensors or the harness's state means walking the heap or raw memory."""
    for module, names in ((gc, ("get_objects", "get_referrers", "get_referents")),
                          (ctypes, ("string_at", "memmove", "cast", "from_address"))):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _flagging(getattr(module, name), "introspection", f"{module.__name__}.{name}"))


def _hook_threads() -> None:
    threading.Thread.start = _flagging(threading.Thread.start, "side_thread",  # type: ignore[method-assign]
                                       "started a thread in forward (work outside the timed stream)")


def _hook_streams(torch: Any) -> None:
    real = torch.cuda.Stream

    class WatchedStream(real):  # type: ignore[misc, valid-type]
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if WATCH.solution:
                WATCH.flag("side_stream", "created a CUDA stream (work on a side stream escapes the timing)")
            return real.__new__(cls, *args, **kwargs)

    torch.cuda.Stream = WatchedStream
    torch.cuda.set_stream = _flagging(torch.cuda.set_stream, "side_stream", "switched the current CUDA stream")


def _flagging(fn: Callable[..., Any], rule: str, what: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if WATCH.solution and not WATCH.paused:
            WATCH.flag(rule, f"called {what}" if rule == "introspection" else what)
        return fn(*args, **kwargs)

    return wrapper


def _op_recorder(torch: Any) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpRecorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if not WATCH.paused:
                self.ops.add(op_name(func))
            return func(*args, **(kwargs or {}))

    return OpRecorder


# ---------------------------------------------------------------- result channel


class Channel:
    """Tagged lines on a private copy of stdout; the solution's prints go to stderr."""

    def __init__(self, nonce: str) -> None:
        sys.stdout.flush()
        self._fd = os.dup(1)
        os.dup2(2, 1)
        self._nonce = nonce

    def _write(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode())

    def stage(self, name: str, index: int = -1) -> None:
        self._write(f"{STAGE_TAG} {self._nonce} {name} {index}")

    def result(self, result: dict[str, Any]) -> None:
        self._write(f"{RESULT_TAG} {self._nonce} {json.dumps(result, default=str)}")


# ---------------------------------------------------------------- setup


def _setup_environment() -> None:
    """Cache directories as absolute paths inside the scratch directory (the sandbox sets the rest)."""
    for key in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        os.environ[key] = os.path.abspath(os.environ.get(key) or "." + key.lower())


def _load_module(name: str, filename: str, source: str) -> Any:
    with open(filename, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(filename))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton reads kernels' source through their module
    spec.loader.exec_module(module)
    return module


def _check_device(torch: Any, device: str) -> None:
    """A tiny op on the device: failing here is the machine's fault, not the solution's."""
    x = torch.arange(1024, device=device, dtype=torch.float32)
    total = float((x + 1).sum().item())
    if total != 524800.0:
        raise RuntimeError(f"device {device} computed a wrong checksum ({total})")


# ---------------------------------------------------------------- comparing outputs


def _tensors(value: Any) -> list[Any] | None:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return None


def compare(got: Any, want: Any, atol: float, rtol: float, input_set: int) -> dict[str, Any] | None:
    """``None`` when every output matches; else a summary of the first mismatch (for the feedback)."""
    got_t, want_t = _tensors(got), _tensors(want)
    if got_t is None:
        return {"kind": "type", "input_set": input_set, "got": type(got).__name__}
    assert want_t is not None
    if len(got_t) != len(want_t):
        return {"kind": "count", "input_set": input_set, "got": len(got_t), "want": len(want_t)}
    for i, (g, w) in enumerate(zip(got_t, want_t, strict=True)):
        bad = _compare_one(g, w, atol, rtol)
        if bad is not None:
            return {**bad, "output": i, "input_set": input_set}
    return None


def _compare_one(g: Any, w: Any, atol: float, rtol: float) -> dict[str, Any] | None:
    import torch

    if tuple(g.shape) != tuple(w.shape):
        return {"kind": "shape", "got": list(g.shape), "want": list(w.shape)}
    if g.dtype != w.dtype:
        return {"kind": "dtype", "got": str(g.dtype), "want": str(w.dtype)}
    g64, w64 = g.detach().to("cpu", torch.float64), w.detach().to("cpu", torch.float64)
    nonfinite = ~torch.isfinite(g64) & torch.isfinite(w64)
    if bool(nonfinite.any()):
        return {"kind": "nonfinite", "count": int(nonfinite.sum()), "total": g64.numel(),
                "index": _first_index(nonfinite), "got_value": _at(g64, nonfinite)}
    close = torch.isclose(g64, w64, atol=atol, rtol=rtol, equal_nan=True)
    if bool(close.all()):
        return None
    diff = (g64 - w64).abs().nan_to_num(nan=float("inf"))
    worst = diff == diff.max()
    rel = diff / w64.abs().clamp_min(1e-12)
    return {"kind": "values", "count": int((~close).sum()), "total": g64.numel(), "atol": atol, "rtol": rtol,
            "max_abs": float(diff.max()), "max_rel": float(rel[~close].max()), "index": _first_index(worst),
            "got_value": _at(g64, worst), "want_value": _at(w64, worst), "first_bad": _first_index(~close)}


def _first_index(mask: Any) -> list[int]:
    return [int(i) for i in mask.nonzero()[0].tolist()] if mask.dim() else []


def _at(t: Any, mask: Any) -> float:
    return float(t[mask].flatten()[0]) if mask.dim() else float(t)


# ---------------------------------------------------------------- the solution's calls


def _storages(value: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (_tensors(value) or []) if t.numel()}


def run_solution(model: Any, inputs: list[Any], recorder: type, earlier: set[int]) -> Any:
    """Call ``model`` under watch, then apply the rules that need its inputs and outputs."""
    import torch

    before = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    mode = recorder()
    with WATCH.forward(), mode, torch.no_grad():
        out = model(*inputs)
    if _device_of(inputs) == "cuda":
        torch.cuda.synchronize()
    WATCH.ops = mode.ops
    if WATCH.launches == 0:
        WATCH.flag("no_triton", "ModelNew.forward launched no Triton kernel (a PyTorch fallback is not a kernel)")
    for i, (x, x0) in enumerate(zip(inputs, before, strict=True)):
        if isinstance(x, torch.Tensor) and not torch.equal(x, x0):
            WATCH.flag("input_mutation", f"ModelNew.forward modified its input {i}")
    outs = _storages(out)
    if outs & {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}:
        WATCH.flag("output_aliases_input", "ModelNew.forward returned (a view of) one of its inputs")
    if outs & earlier:
        WATCH.flag("cached_output", "ModelNew.forward returned the same tensor storage as an earlier call")
    return out


def _device_of(inputs: list[Any]) -> str:
    for x in inputs:
        if hasattr(x, "device"):
            return str(x.device.type)
    return "cpu"


def forbidden_ops(payload: dict[str, Any], reference_ops: set[str]) -> set[str]:
    """The ops the solution may not call: the problem's list, else the reference's compute ops."""
    if "forbid" in payload:
        return {n.split(".")[-1].strip("_") for n in payload["forbid"]}
    return reference_ops - ALLOWED_OPS


# ---------------------------------------------------------------- timing


def time_ms(torch: Any, fn: Callable[..., Any], inputs: list[Any], warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn(*inputs)`` by CUDA events on the current stream, synchronised each rep."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(torch: Any, payload: dict[str, Any], new: Any, ref: Any, inputs: list[Any]) -> dict[str, Any]:
    warmup, reps = int(payload.get("warmup", 5)), int(payload.get("reps", 30))
    timing: dict[str, Any] = {"solution_ms": time_ms(torch, new, inputs, warmup, reps),
                              "eager_ms": time_ms(torch, ref, inputs, warmup, reps), "compile_ms": None}
    if payload.get("compile_baseline", True):
        try:
            timing["compile_ms"] = time_ms(torch, torch.compile(ref), inputs, warmup, reps)
        except Exception as exc:  # the baseline's failure is reported, not the solution's
            timing["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return timing


# ---------------------------------------------------------------- the evaluation


def _error(exc: BaseException) -> str:
    """The traceback, keeping only frames in the solution and the exception itself."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith("solution.py")]
    lines = traceback.format_list(frames[-6:])
    tail = "".join(traceback.format_exception_only(type(exc), exc))
    return ("".join(lines) + tail)[-3000:]


class Failed(Exception):
    """The evaluation stops at a stage; ``result`` already says why."""


def evaluate(payload: dict[str, Any], channel: Channel, result: dict[str, Any]) -> None:
    import torch

    device = "cuda" if payload.get("device") == "cuda" else "cpu"
    _check_device(torch, device)
    reference = _load_module("_kernelgen_reference", "reference.py", payload["reference"])
    recorder = _install_hooks(torch, reference.Model)
    seed = int(payload.get("seed", 0))
    torch.manual_seed(seed)
    init_inputs = reference.get_init_inputs()
    ref = reference.Model(*init_inputs).to(device).eval()
    new = _build_solution(payload, channel, result, torch, init_inputs, ref, device)
    reference_ops = _reference_ops(torch, ref, reference, seed, device, recorder)
    _check_sets(payload, channel, result, torch, reference, new, ref, recorder, reference_ops, device)
    if payload.get("timing") and device == "cuda":
        channel.stage("timing")
        torch.manual_seed(seed)
        inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in reference.get_inputs()]
        result["timing"] = measure(torch, payload, new, ref, inputs)


def _build_solution(payload: dict[str, Any], channel: Channel, result: dict[str, Any], torch: Any,
                    init_inputs: list[Any], ref: Any, device: str) -> Any:
    channel.stage("import")
    result["stage"] = "import"
    WATCH.solution = True
    try:
        solution = _load_module("solution", "solution.py", payload["solution"])
        if not isinstance(getattr(solution, "ModelNew", None), type):
            result["error"] = "the code defines no class ModelNew"
            raise Failed
        channel.stage("init")
        result["stage"] = "init"
        torch.manual_seed(int(payload.get("seed", 0)))
        new = solution.ModelNew(*init_inputs)
        _copy_weights(torch, ref, new)
        return new.to(device).eval()
    except Failed:
        raise
    except BaseException as exc:
        result["error"] = _error(exc)
        raise Failed from exc
    finally:
        WATCH.solution = False


def _copy_weights(torch: Any, ref: Any, new: Any) -> None:
    """Give ModelNew the reference's weights wherever names and shapes agree (same-seed init does the rest)."""
    if not isinstance(new, torch.nn.Module):
        raise TypeError("ModelNew must be a torch.nn.Module")
    theirs = new.state_dict()
    same = {k: v for k, v in ref.state_dict().items() if k in theirs and theirs[k].shape == v.shape}
    new.load_state_dict(same, strict=False)


def _reference_ops(torch: Any, ref: Any, reference: Any, seed: int, device: str, recorder: type) -> set[str]:
    torch.manual_seed(seed)
    inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in reference.get_inputs()]
    mode = recorder()
    with mode, torch.no_grad():
        ref(*inputs)
    return set(mode.ops)


def _check_sets(payload: dict[str, Any], channel: Channel, result: dict[str, Any], torch: Any, reference: Any,
                new: Any, ref: Any, recorder: type, reference_ops: set[str], device: str) -> None:
    forbidden = forbidden_ops(payload, reference_ops)
    atol, rtol = float(payload.get("atol", 1e-3)), float(payload.get("rtol", 1e-3))
    earlier: set[int] = set()
    kept = []  # earlier outputs stay alive so a new allocation cannot reuse their addresses
    sets = int(payload.get("sets", 3))
    for i in range(sets):
        result["stage"] = "run" if i == 0 else "check"
        channel.stage(result["stage"], i)
        torch.manual_seed(int(payload.get("seed", 0)) + 1000 + i)
        inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in reference.get_inputs()]
        try:
            out = run_solution(new, inputs, recorder, earlier)
        except BaseException as exc:
            result["error"] = _error(exc)
            raise Failed from exc
        result["compiled"] = True
        used = sorted(WATCH.ops & forbidden)
        if used:
            WATCH.flag("forbidden_op", f"ModelNew.forward called torch op(s) {used}, which this problem forbids")
        if WATCH.violations:
            raise Failed
        with torch.no_grad():
            want = ref(*inputs)
        mismatch = compare(out, want, atol, rtol, i)
        if mismatch is not None:
            result["mismatch"] = mismatch
            raise Failed
        del want
        kept.append(out)
        earlier |= _storages(out)
        result["sets_passed"] = i + 1
    result["correct"] = True
    result["stage"] = "done"


def main(payload: dict[str, Any]) -> None:
    channel = Channel(str(payload.get("nonce", "")))
    faulthandler.enable()  # a segfault in a kernel prints the Python frames that launched it
    channel.stage("setup")
    result: dict[str, Any] = {"stage": "setup", "compiled": False, "correct": False, "sets": payload.get("sets", 3),
                              "sets_passed": 0}
    try:
        _setup_environment()
        evaluate(payload, channel, result)
    except Failed:
        pass
    except BaseException as exc:  # the solution's own failures are caught where it runs: this is ours
        result["error"] = "".join(traceback.format_exception(exc))[-3000:]
        result["harness_error"] = True
    result["violations"] = [{"rule": k, "detail": v} for k, v in WATCH.violations.items()]
    result["launches"] = WATCH.launches
    channel.result(result)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: nothing the solution left behind runs after the verdict
