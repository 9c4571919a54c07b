"""What one checkpoint of a LoRA student costs on disk, part by part.

Builds the student the trainer builds (`model.dtype`, LoRA on every linear layer of the
recipe's defaults), moves its adapters the way one optimizer step does (B gets small
values), lets the EMA teacher follow, and writes the checkpoint with the trainer's own
`save_checkpoint`. Prints the size of each part and of the teacher state in the format
before compact checkpoints (bf16 model copy + float32 records), for comparison.

    python benchmarks/checkpoint_size.py --model packaged:qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mopd.config import LoraSettings
from mopd.models.loading import load_model, load_tokenizer
from mopd.models.lora import add_lora
from mopd.models.teachers import EmaTeacher
from mopd.training.checkpoint import TrainerState, save_checkpoint


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else (path.stat().st_size)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="packaged:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None, help="write the sizes as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    lora = LoraSettings(r=args.lora_r)
    student = add_lora(
        load_model(args.model, dtype=args.dtype),
        r=lora.r,
        alpha=lora.alpha,
        target_modules=lora.target_modules,
    )
    teacher = EmaTeacher(student, rate=0.05)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    with torch.no_grad():  # one step's worth of adapter change, and AdamW state for it
        for p in student.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    teacher.update(student)
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        t0 = time.perf_counter()
        ckpt = save_checkpoint(
            Path(tmp),
            state=TrainerState(step=1, data_position=2),
            student=student,
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            teacher=teacher,
        )
        seconds = time.perf_counter() - t0
        assert ckpt is not None
        sizes = {p.name: _size(p) for p in sorted(ckpt.iterdir())}
        old = Path(tmp) / "teacher-full.pt"  # the teacher state before compact checkpoints
        torch.save({**teacher.model.state_dict(), **teacher.state_dict()}, old)
        sizes["(teacher.pt before compaction)"] = _size(old)
    total = sum(v for k, v in sizes.items() if not k.startswith("("))
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "lora_r": args.lora_r,
        "recorded_weights": len(teacher.exact),
        "save_seconds": round(seconds, 1),
        "bytes": sizes,
        "checkpoint_bytes": total,
    }
    for name, size in sizes.items():
        print(f"{name:34s} {size / 2**30:7.2f} GiB")
    print(f"{'checkpoint':34s} {total / 2**30:7.2f} GiB, written in {seconds:.0f} s")
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
