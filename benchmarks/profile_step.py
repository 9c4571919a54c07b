"""Where one MOPD step spends its time: torch.profiler operator table of a timed step.

    python benchmarks/profile_step.py [--method mopd] [--rows 25] [--name profile_mopd]

Same setting as step_time.py (`sysbench.Setting`); one untimed warm-up step, then one
profiled step. Prints the operators by self CPU time and writes them to
benchmarks/results/systems/<name>.md (default: profile_<method>).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import sysbench
import torch
from step_time import our_overrides
from sysbench import Setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mopd")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--name", default=None, help="result file's name (default profile_METHOD)")
    Setting().add_arguments(parser)
    args = parser.parse_args()
    s = Setting.from_args(args)

    from mopd.config import load_config
    from mopd.core.seeding import derive_seed
    from mopd.training.step import train_step
    from mopd.training.trainer import Trainer, training_problems

    cfg = load_config(None, our_overrides(args.method, s))
    trainer = Trainer(cfg, run_dir=Path(tempfile.mkdtemp(prefix="profile-")))

    def step(i: int) -> dict[str, float]:
        problems = training_problems(
            trainer.train_problems, seed=s.seed, start=i * s.prompts, count=s.prompts
        )
        _, metrics = train_step(trainer.parts, problems, seed=derive_seed(s.seed, "step", i))
        return {k: round(v, 3) for k, v in metrics.items() if k.startswith("time/")}

    print("warm-up", step(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        times = step(1)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    machine = sysbench.machine()
    text = f"{machine}\n\nstep times: {times}\n\n```\n{table}\n```"
    out = sysbench.RESULTS / f"{args.name or 'profile_' + args.method}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
