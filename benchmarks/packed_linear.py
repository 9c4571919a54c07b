"""One bf16 linear layer on CPU: plain `F.linear` against the weight packed once for oneDNN.

    python benchmarks/packed_linear.py              # Qwen2.5-1.5B's MLP and LM-head shapes
    python benchmarks/packed_linear.py --threads 1 --rows 1,16,512
    python benchmarks/packed_linear.py --model packaged:qwen2.5-coder-1.5b-instruct \
        --lengths 16,600 --name packed_logits     # how far a whole model's logits move

With `--model`, one forward of random token ids per length, plain and packed: the mean
and largest absolute logit difference, the mean KL divergence of the packed
distribution from the plain one, and how often the top token agrees.

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


def logit_differences(model_name: str, lengths: list[int], seed: int = 0) -> list[list[object]]:
    """Per length: plain and packed logits of one forward of random ids, compared."""
    from transformers import AutoModelForCausalLM

    from mopd.models.loading import resolve_model_path

    path = resolve_model_path(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
        with torch.no_grad():
            plain = model(ids).logits.float()[0]
            with packed_linears(model):
                packed = model(ids).logits.float()[0]
        diff = (packed - plain).abs()
        logp, logq = plain.log_softmax(-1), packed.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        top = (plain.argmax(-1) == packed.argmax(-1)).float().mean()
        rows.append([length, float(diff.mean()), float(diff.max()), float(kl.mean()), float(top)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8960x1536,1536x8960,151936x1536", help="OUTxIN,...")
    parser.add_argument("--rows", default="1,16,64,512,2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--peak-gflops", type=float, default=2315.0)
    parser.add_argument("--read-gbps", type=float, default=27.2)
    parser.add_argument("--model", default=None, help="compare a whole model's logits instead")
    parser.add_argument("--lengths", default="16,600", help="with --model: tokens per forward")
    parser.add_argument("--name", default="packed_linear")
    parser.add_argument("--out", type=Path, default=None, help="default: results/systems")
    args = parser.parse_args()
    if not packing_available():
        raise SystemExit("this CPU/torch build cannot pack bf16 weights for oneDNN")
    torch.set_num_threads(args.threads)
    result = {"command": " ".join(["python", *sys.argv]), "args": {**vars(args), "out": None}}
    if args.model:
        lengths = [int(x) for x in args.lengths.split(",")]
        rows = logit_differences(args.model, lengths)
        headers = ["tokens", "mean abs Δ logit", "max abs Δ logit", "mean KL", "same top token"]
        keys = ("tokens", "mean_abs", "max_abs", "mean_kl", "top_agreement")
        data = [dict(zip(keys, row, strict=True)) for row in rows]
        record = {**result, "machine": sysbench.machine(), "rows": data}
        sysbench.save(args.name, record, sysbench.md_table(headers, rows), args.out)
        return
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
    data = {**result, "machine": sysbench.machine(), "rows": data}
    sysbench.save(args.name, data, table, args.out)


if __name__ == "__main__":
    main()
