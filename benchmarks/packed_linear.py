"""One bf16 linear layer on CPU: plain `F.linear` against the weight packed once for oneDNN.

    python benchmarks/packed_linear.py              # Qwen2.5-1.5B's MLP and LM-head shapes
    python benchmarks/packed_linear.py --threads 1 --rows 1,16,512

For each weight shape and row count (16 rows: one decoding step of 2 prompts x 8
rollouts; hundreds: a prompt's prefill or a teacher pass) the median time of the plain
call and of `mopd.models.packing`'s packed call, and the two bounds: reading the weight
once at `--read-gbps` and the product at `--peak-gflops` (this machine's measured
bf16 rates, docs/benchmarks.md). Also the time to pack each weight, paid once per block.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import sysbench
import torch
from torch import nn

from mopd.models.packing import packed_linears, packing_available


def median_s(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8960x1536,1536x8960,151936x1536", help="OUTxIN,...")
    parser.add_argument("--rows", default="1,16,64,512,2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--peak-gflops", type=float, default=2315.0)
    parser.add_argument("--read-gbps", type=float, default=27.2)
    parser.add_argument("--name", default="packed_linear")
    parser.add_argument("--out", type=Path, default=None, help="default: results/systems")
    args = parser.parse_args()
    if not packing_available():
        raise SystemExit("this CPU/torch build cannot pack bf16 weights for oneDNN")
    torch.set_num_threads(args.threads)
    rows_out, data = [], []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(x) for x in shape.split("x"))
        layer = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        t0 = time.perf_counter()
        with packed_linears(layer, min_elements=0):
            pack_s = time.perf_counter() - t0
        read_s = layer.weight.numel() * 2 / (args.read_gbps * 1e9)
        for m in (int(x) for x in args.rows.split(",")):
            x = torch.randn(m, in_f, dtype=torch.bfloat16)
            with torch.no_grad():
                plain = median_s(lambda x=x, layer=layer: layer(x), args.reps)
                with packed_linears(layer, min_elements=0):
                    packed = median_s(lambda x=x, layer=layer: layer(x), args.reps)
            peak_s = 2 * m * out_f * in_f / (args.peak_gflops * 1e9)
            bound = max(read_s, peak_s)
            row = [shape, m, plain * 1e3, packed * 1e3, plain / packed, bound * 1e3, pack_s * 1e3]
            rows_out.append(row)
            data.append(dict(zip(("shape", "rows", "plain_ms", "packed_ms"), row[:4], strict=True)))
    headers = ["weight", "rows", "plain ms", "packed ms", "plain / packed", "bound ms", "pack ms"]
    table = sysbench.md_table(headers, rows_out)
    result = {"command": " ".join(["python", *sys.argv]), "args": {**vars(args), "out": None}}
    data = {**result, "machine": sysbench.machine(), "rows": data}
    sysbench.save(args.name, data, table, args.out)


if __name__ == "__main__":
    main()
