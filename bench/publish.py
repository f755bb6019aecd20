"""Publishing a weights version to disk (``trainer.weights.DiskWeightSink.write``), phase by phase.

The learner's disk path writes the model's safetensors (``save_pretrained``: device to host, then the file),
then digests the directory for ``WeightUpdate.sha256``. The digest used to be one serial sha256 over the
bytes (~1.6 GB/s); ``digest_dir`` now hashes 16 MiB blocks on several threads. Both are timed on the same
freshly written version, in the same run, and the whole write is timed with the new digest:

    python bench/publish.py                                                  # small model, CPU
    python bench/publish.py --shape qwen2.5-0.5b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import wall_seconds as timed
from bench.learner import SHAPES, make_model
from trainer.weights import DiskWeightSink, digest_dir


def serial_digest(path: Path) -> str:
    """The baseline: one sha256 over every file's name and bytes, read 4 MiB at a time."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = make_model(args.shape, "sdpa", torch.device(args.device)).to(getattr(torch, args.dtype))
    times: dict[str, list[float]] = {"export": [], "serial sha256": [], "digest_dir": [], "write (new digest)": []}
    with tempfile.TemporaryDirectory() as root:
        sink = DiskWeightSink(Path(root), keep=1)
        for k in range(args.repeats):
            out = Path(root) / f"export{k}"
            times["export"].append(timed(lambda: model.save_pretrained(str(out))))  # noqa: B023
            times["serial sha256"].append(timed(lambda: serial_digest(out)))  # noqa: B023
            times["digest_dir"].append(timed(lambda: digest_dir(out)))  # noqa: B023
            nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            shutil.rmtree(out)
            times["write (new digest)"].append(timed(lambda: sink.write(k + 1, lambda d: model.save_pretrained(str(d)))))  # noqa: B023
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"shape={args.shape} device={args.device} dtype={args.dtype} bytes={nbytes:,} repeats={args.repeats}")
    for name, s in med.items():
        print(f"{name:20s} {s * 1000:9.1f} ms")
    print(f"digest: digest_dir {med['serial sha256'] / med['digest_dir']:.2f}x the serial sha256 "
          f"({nbytes / med['digest_dir'] / 1e9:.2f} vs {nbytes / med['serial sha256'] / 1e9:.2f} GB/s)")
    old = med["export"] + med["serial sha256"]
    print(f"publish: export + digest {old:.3f} s -> {med['export'] + med['digest_dir']:.3f} s "
          f"({old / (med['export'] + med['digest_dir']):.2f}x)")


if __name__ == "__main__":
    main()
