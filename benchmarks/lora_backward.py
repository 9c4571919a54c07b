"""Forward + backward of a bf16 LoRA student on CPU: PEFT's path, the fused one, and a floor.

    python benchmarks/lora_backward.py                  # 1.5B, one micro-batch of 2 x 450
    python benchmarks/lora_backward.py --rows 2 --tokens 600 --rounds 3

One micro-batch of random token ids (the cost does not depend on what they say), its
logits on the last `--response` positions as a training step keeps them, a scalar loss,
backward. Variants alternate (peft, fused, floor, peft, ...) after one warm-up each:

- peft: PEFT's LoRA layers (`W·x` in bf16, the update over float32 copies);
- fused: `mopd.models.fused_lora.fused_lora_training` (what training runs);
- floor: the adapters switched off and the gradient sent through the frozen weights
  from the input embeddings: what any LoRA backward must at least do.

Also reports how far the fused gradients of the adapters are from PEFT's (relative
norm of the difference) on the last round's batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import sysbench
import torch

from mopd.models.fused_lora import fused_lora_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=450)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="lora_backward_qwen1.5b")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = sysbench.random_lora_student(args.model, args.rank, b_scale=1e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20_000, (args.rows, args.tokens), generator=generator)
    embed = model.get_input_embeddings()
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]

    def loss(**inputs: torch.Tensor) -> torch.Tensor:
        logits = model(**inputs, logits_to_keep=args.response).logits
        return logits.float().logsumexp(-1).mean()

    def peft() -> None:
        loss(input_ids=ids).backward()

    def fused() -> None:
        with fused_lora_training(model):
            loss(input_ids=ids).backward()

    def floor() -> None:
        with model.disable_adapter():
            loss(inputs_embeds=embed(ids).detach().requires_grad_(True)).backward()

    variants: dict[str, Callable[[], None]] = {"peft": peft, "fused": fused, "floor": floor}
    times: dict[str, list[float]] = {v: [] for v in variants}
    grads: dict[str, list[torch.Tensor]] = {}
    for round_ in range(args.rounds + 1):  # round 0: warm-up
        for variant, run in variants.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            run()
            seconds = time.perf_counter() - t0
            if round_ > 0:
                times[variant].append(seconds)
            if variant != "floor":
                grads[variant] = [p.grad.clone() for p in adapters]
            print(f"round {round_} {variant}: {seconds:.2f} s", flush=True)
    pairs = zip(grads["fused"], grads["peft"], strict=True)
    difference = sum((f - p).norm() ** 2 for f, p in pairs) ** 0.5
    size = sum(p.norm() ** 2 for p in grads["peft"]) ** 0.5
    data = {
        "machine": sysbench.machine(),
        "args": vars(args),
        "seconds": times,
        "fused_vs_peft_gradient": float(difference / size),
    }
    rows = [[v, statistics.median(t)] for v, t in times.items()]
    table = sysbench.md_table(["variant", "forward + backward s (median)"], rows)
    table += f"\n\nadapter gradients, |fused - peft| / |peft|: {difference / size:.2e}; "
    table += f"{args.rows} rows x {args.tokens} tokens; {data['machine']}"
    sysbench.save(args.name, data, table)


if __name__ == "__main__":
    main()
