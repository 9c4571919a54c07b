"""Shared pieces of the systems benchmark: the matched setting, machine facts, peak memory,
worker subprocesses and markdown tables.

Every measured configuration runs in its own subprocess (a "worker") so that its peak
resident memory is its own; the parent alternates workers of the compared variants, so a
load change on the shared machine hits all of them alike, and reports ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "systems"


@dataclass(frozen=True)
class Setting:
    """What both our trainer and TRL's SDPO trainer are given, field for field."""

    model: str = "packaged:smollm2-135m-instruct"
    prompts: int = 4  # P prompts per step
    n: int = 4  # G rollouts per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling and loss temperature (TRL divides loss logits by it)
    topk: int = 100  # loss support: student's top-k + tail bucket
    alpha: float = 0.5  # generalised JSD
    lr: float = 1e-5
    threads: int = 1
    device: str = "auto"  # auto: cuda when available
    grad_ckpt: int = 0  # 1: gradient checkpointing (TRL's SDPOConfig defaults to on)
    seed: int = 0
    warmup: int = 1  # steps run first and not timed
    steps: int = 3  # timed steps
    digits: int = 1  # one-digit addition: mixed success/failure groups
    terms: int = 2
    task: str = "arithmetic"  # or "humaneval": the code task on HumanEval's problems
    dtype: str = "float32"  # weights' dtype (model.dtype)
    lora: int = 0  # LoRA rank; 0 trains every weight
    micro_batch: int = 0  # rollouts per forward/backward; 0: all of the step's

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for f in fields(self):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(self, f.name)))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Setting:
        given = {f.name: getattr(args, f.name) for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None})

    def argv(self) -> list[str]:
        return [a for k, v in asdict(self).items() for a in (f"--{k.replace('_', '-')}", str(v))]


def machine() -> dict[str, Any]:
    """Where and when a measurement ran: date, load average, cores, torch build."""
    import torch

    load1, load5, load15 = os.getloadavg()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict[str, Any]) -> None:
    """A worker's last stdout line: its JSON result for the parent."""
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(
    script: str, argv: list[str], timeout: float = 1800, pythonpath: Path | None = None
) -> dict[str, Any]:
    """Run `benchmarks/<script>` in a fresh interpreter and return what it `emit`ted.

    `pythonpath`: a folder holding another `mopd` package to import instead of ours."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"worker {script} {' '.join(argv)} failed (rc {proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    result["process_wall_s"] = time.perf_counter() - t0
    return result


# The files the speed work may change: a baseline source tree takes these from a revision.
SPEED_FILES = (
    "src/mopd/training/step.py",
    "src/mopd/core/losses.py",
    "src/mopd/models/scoring.py",
)


def baseline_tree(rev: str) -> Path:
    """A copy of this checkout's `src/` with `SPEED_FILES` as they were at git `rev`.

    Returns the folder to put on PYTHONPATH: the rest of the package is the working tree's,
    so a before/after comparison isolates the speed changes."""
    root = HERE.parent
    folder = Path(tempfile.mkdtemp(prefix=f"mopd-{rev}-"))
    shutil.copytree(root / "src", folder / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for path in SPEED_FILES:
        text = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
        (folder / path).write_text(text)
    return folder / "src"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(out)


def save(name: str, data: dict[str, Any], table: str, out_dir: Path | None = None) -> Path:
    """Write `<name>.json` and `<name>.md` under `out_dir` (default benchmarks/results/systems)."""
    folder = out_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (folder / f"{name}.md").write_text(table + "\n")
    print(table)
    return folder / f"{name}.json"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_lora_student(model: str, rank: int, b_scale: float, seed: int = 0) -> Any:
    """`model` in bf16 with LoRA adapters of `rank` on every linear layer of its blocks and
    B drawn at `b_scale` (at init B = 0 and the adapters' products would all be zero)."""
    import torch

    from mopd.models.loading import load_model
    from mopd.models.lora import add_lora

    student = add_lora(
        load_model(model, dtype="bfloat16"),
        r=rank,
        alpha=float(rank),
        target_modules=LORA_TARGETS,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    return student
