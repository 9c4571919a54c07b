"""A task plugin for trainer tests: a random tiny model gets mixed rewards on it.

Reward 1 when the response has an even number of characters: about half the samples of
any model succeed, so groups are mixed and every method has signal to learn from.
"""

from __future__ import annotations

from dataclasses import dataclass

from mopd.types import Problem, Verdict


@dataclass(frozen=True)
class ParityTask:
    n_train: int = 16
    n_eval: int = 4
    name: str = "parity"

    def _problems(self, split: str, n: int) -> list[Problem]:
        return [
            Problem(
                id=f"parity-{split}-{i}",
                messages=({"role": "user", "content": f"Say something ({split} {i})."},),
            )
            for i in range(n)
        ]

    def train_problems(self) -> list[Problem]:
        return self._problems("train", self.n_train)

    def eval_problems(self) -> list[Problem]:
        return self._problems("eval", self.n_eval)

    def verify(self, problem: Problem, response: str) -> Verdict:
        ok = len(response) % 2 == 0
        return Verdict(reward=1.0 if ok else 0.0, feedback=None if ok else "odd length")


def make_parity_task(**options: int) -> ParityTask:
    return ParityTask(**options)


def tiny_run_overrides(output_dir: object, model_dir: object) -> list[str]:
    """Overrides for a seconds-long run of a tiny model on the parity task.

    On the CPU also where CUDA is present: these runs are compared with CPU tensors and
    CPU-only paths; the CUDA tests (tests/gpu) override the device.
    """
    return [
        f"model.name={model_dir}",
        "model.device=cpu",
        "task.name=tasks_for_tests:make_parity_task",
        "rollout.n=4",
        "rollout.max_new_tokens=8",
        "train.prompts_per_step=2",
        "train.micro_batch_size=3",
        "train.steps=2",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "optim.weight_decay=0",
        "eval.every=0",
        "eval.k=2",
        f"logging.output_dir={output_dir}",
        "logging.progress=false",
    ]
