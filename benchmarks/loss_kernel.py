"""Time and extra memory of the distillation loss: top-k (+ tail) vs the full vocabulary.

    python benchmarks/loss_kernel.py                      # V 49152 and 151936, B 1 2 4
    python benchmarks/loss_kernel.py --device cuda        # on a GPU (memory from the allocator)

`mopd.core.losses.topk_divergence` (k=100, tail, alpha 0.5, the paper's loss) against the
same function with k=None (full vocabulary), forward + backward on random logits
[B, T, V]. One worker process per (V, B); inside it the two variants alternate.

Memory method (CPU): what the loss allocates *beyond its inputs*. The worker allocates
the student and teacher logits first, then for each measured call resets the kernel's
peak-RSS mark (`echo 5 > /proc/self/clear_refs`), runs forward and backward, and reads
`VmHWM` (peak RSS since the reset) minus the RSS before the call. glibc is told to serve
every allocation of 1 MiB or more with mmap (`MALLOC_MMAP_THRESHOLD_`), so freed tensors
go back to the kernel and RSS follows the live tensors. Two numbers: `held` (RSS after the
forward, i.e. what autograd keeps until backward) and `peak` (the high-water mark of
forward + backward). `peak` includes the gradient of the student logits, a [B, T, V]
float32 tensor that every loss must produce; `peak - grad` is the rest. On CUDA the same
quantities come from `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sysbench
import torch

from mopd.core.losses import topk_divergence


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Meter:
    """Peak and current memory beyond a baseline: CPU RSS or the CUDA allocator."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return _rss_kb("VmRSS:") / 1024

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _rss_kb("VmHWM:") / 1024


def measure(
    student: torch.Tensor, teacher: torch.Tensor, k: int | None, meter: Meter, fn: Any
) -> dict[str, float]:
    student.grad = None
    base = meter.now()
    meter.reset_peak()
    t0 = time.perf_counter()
    loss = fn(student, teacher, k=k, alpha=0.5, add_tail=True).mean()
    held = meter.now() - base
    loss.backward()
    if meter.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = meter.peak() - base
    grad_mb = student.numel() * student.element_size() / 2**20
    del loss
    student.grad = None
    return {
        "seconds": seconds,
        "held_mb": held,
        "peak_mb": peak,
        "peak_minus_grad_mb": peak - grad_mb,
    }


def _load_baseline(path: str) -> Any:
    """`topk_divergence` of another losses.py file (it imports only torch and math)."""
    spec = importlib.util.spec_from_file_location("losses_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.topk_divergence


def worker(
    v: int, b: int, t: int, k: int, reps: int, device: str, full: bool, baseline: str | None
) -> dict[str, Any]:
    dev = torch.device(device)
    meter = Meter(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    student = torch.randn(b, t, v, generator=gen, device=dev).requires_grad_(True)
    teacher = torch.randn(b, t, v, generator=gen, device=dev) * 2
    variants: dict[str, tuple[int | None, Any]] = {"topk": (k, topk_divergence)}
    if baseline:
        variants["topk-base"] = (k, _load_baseline(baseline))
    if full:
        variants["full"] = (None, topk_divergence)
    for kk, fn in variants.values():  # warm-up: first-call allocations, thread pools
        measure(student, teacher, kk, meter, fn)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, (kk, fn) in variants.items():
            runs[name].append(measure(student, teacher, kk, meter, fn))
    out: dict[str, Any] = {"V": v, "B": b, "T": t, "input_mb": 2 * student.numel() * 4 / 2**20}
    for name, rs in runs.items():
        out[name] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "held_mb": max(r["held_mb"] for r in rs),
            "peak_mb": max(r["peak_mb"] for r in rs),
            "peak_minus_grad_mb": max(r["peak_minus_grad_mb"] for r in rs),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="49152,151936")
    parser.add_argument("--batch", default="1,2,4")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--full-max-gb",
        type=float,
        default=6.0,
        help="skip the full-vocabulary variant when one [B, T, V] float32 tensor exceeds "
        "this / 8 (it makes several): protects a small machine",
    )
    parser.add_argument(
        "--baseline-rev", default=None, help="also time losses.py of this git revision"
    )
    parser.add_argument("--baseline-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=2, type=int, metavar=("V", "B"))
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        v, b = args.worker
        res = worker(
            v, b, args.tokens, args.k, args.reps, args.device, args.full, args.baseline_file
        )
        sysbench.emit(res)
        return

    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    extra = []
    if args.baseline_rev:
        source = subprocess.run(
            ["git", "show", f"{args.baseline_rev}:src/mopd/core/losses.py"],
            cwd=sysbench.HERE.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        path = Path(tempfile.mkdtemp(prefix="losses-")) / "losses_baseline.py"
        path.write_text(source)
        extra = ["--baseline-file", str(path)]
    t_start = time.perf_counter()
    results = []
    for v in (int(x) for x in args.vocab.split(",")):
        for b in (int(x) for x in args.batch.split(",")):
            full = b * args.tokens * v * 4 * 8 <= args.full_max_gb * 2**30
            argv = [*sys.argv[1:], *extra, "--worker", str(v), str(b)]
            argv += ["--full"] if full else []
            res = sysbench.run_worker("loss_kernel.py", argv)
            res["load_avg"] = sysbench.machine()["load_avg"]
            results.append(res)
            print(f"V={v} B={b}: {res}", file=sys.stderr)

    rows = []
    for r in results:
        for name in ("topk", "topk-base", "full"):
            if name in r:
                m = r[name]
                rows.append([r["V"], r["B"], name, m["seconds"], m["held_mb"], m["peak_mb"]])
                rows[-1].append(m["peak_minus_grad_mb"])
    headers = ["V", "B", "loss", "fwd+bwd s", "held MB", "peak MB", "peak - grad MB"]
    table = sysbench.md_table(headers, rows)
    flat = []
    for r in results:
        for other in results:
            if r["B"] == other["B"] and r["V"] < other["V"]:
                for name in ("topk", "topk-base"):
                    if name in r and name in other:
                        small, big = r[name], other[name]
                        flat.append(
                            [
                                name,
                                r["B"],
                                f"{r['V']} -> {other['V']}",
                                big["peak_mb"] / small["peak_mb"],
                                big["peak_minus_grad_mb"] / small["peak_minus_grad_mb"],
                            ]
                        )
    if flat:
        table += "\n\n" + sysbench.md_table(
            ["loss", "B", "V", "peak ratio", "peak - grad ratio"], flat
        )
    data = {
        "command": " ".join(["python", *sys.argv]),
        "machine": sysbench.machine(),
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    sysbench.save("loss_kernel", data, table, out_dir=None if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
