"""Anonymous memory of training steps: the peak within each step and what stays after it.

    python benchmarks/step_memory.py --model packaged:qwen2.5-coder-1.5b-instruct \
        --dtype bfloat16 --lora 16 --task humaneval --prompts 2 --n 8 \
        --max-new-tokens 128 --temperature 0.7 --micro-batch 4 --threads 2 --warmup 0 --steps 2

A thread samples the process's RssAnon (what the kernel counts against memory limits;
memory-mapped weights are file-backed and not in it) every 0.2 s. `train_step` ends by
returning freed heap memory to the system (`mopd.training.memory`), so "after" is what the
next step starts from. `--mmap-threshold-mib N` sets glibc's M_MMAP_THRESHOLD first: every
allocation of N MiB or more is then its own mapping, returned to the system when freed,
which trades page faults for a lower peak.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import threading
import time
from pathlib import Path

import sysbench
from step_time import our_overrides
from sysbench import Setting

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def anon_gib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))
    return kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mopd")
    parser.add_argument("--mmap-threshold-mib", type=int, default=None)
    parser.add_argument("--name", default="step_memory", help="result files' name")
    Setting().add_arguments(parser)
    args = parser.parse_args()
    s = Setting.from_args(args)
    if args.mmap_threshold_mib is not None:
        ok = ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, args.mmap_threshold_mib << 20)
        if not ok:
            sys.exit("mallopt(M_MMAP_THRESHOLD) failed")
    import torch

    from mopd.config import load_config
    from mopd.core.seeding import derive_seed
    from mopd.training.step import train_step
    from mopd.training.trainer import Trainer, training_problems

    torch.set_num_threads(s.threads)
    peak = [0.0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], anon_gib())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    cfg = load_config(None, our_overrides(args.method, s))
    trainer = Trainer(cfg, run_dir=Path(tempfile.mkdtemp(prefix="step_memory-")))
    loaded = anon_gib()
    rows = []
    for i in range(s.warmup + s.steps):
        peak[0] = anon_gib()
        problems = training_problems(
            trainer.train_problems, seed=s.seed, start=i * s.prompts, count=s.prompts
        )
        _, metrics = train_step(trainer.parts, problems, seed=derive_seed(s.seed, "step", i))
        rows.append([i, peak[0], anon_gib(), *(metrics[f"time/{p}"] for p in PHASES)])
        print(
            " ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in rows[-1]), flush=True
        )
    head = f"RssAnon after loading: {loaded:.2f} GiB; M_MMAP_THRESHOLD: "
    head += f"{args.mmap_threshold_mib} MiB\n\n" if args.mmap_threshold_mib else "glibc default\n\n"
    table = head + sysbench.md_table(
        ["step", "peak GiB", "after GiB", *(f"{p} s" for p in PHASES)], rows
    )
    data = {
        "command": " ".join(["python", *sys.argv]),
        "setting": vars(s),
        "machine": sysbench.machine(),
        "loaded_gib": loaded,
        "steps": [
            dict(zip(["step", "peak_gib", "after_gib", *PHASES], r, strict=True)) for r in rows
        ],
    }
    sysbench.save(args.name, data, table, None)


PHASES = ("generate", "teacher", "student", "optimizer", "step")

if __name__ == "__main__":
    main()
