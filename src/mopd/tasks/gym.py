"""Procedural tasks from `reasoning-gym`, scored by the generators' own `score_answer`.

`ReasoningGymTask(dataset="chain_sum", size=200, n_eval=50)` draws `size` problems with
`reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)` and splits them.
The answer is the content of the last `<answer>...</answer>` tag (the generators' own
convention); the generator's score (0..1, partial credit for some) is the reward.
`reasoning-gym` is an optional extra (`pip install 'mopd[gym]'`), imported lazily.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mopd.tasks.base import FixedSplits
from mopd.tasks.data import split_rows
from mopd.types import Problem, Verdict

__all__ = ["ReasoningGymTask"]

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_SUFFIX = "\n\nGive only the final answer inside <answer></answer> tags."


def _import_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError("ReasoningGymTask needs reasoning-gym: pip install 'mopd[gym]'") from exc
    return reasoning_gym


@dataclass(frozen=True)
class ReasoningGymTask(FixedSplits):
    """One reasoning-gym generator (e.g. chain_sum, basic_arithmetic, countdown, gsm_symbolic)."""

    dataset: str = "chain_sum"
    size: int = 200
    n_eval: int = 40
    seed: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    _data: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"ReasoningGymTask.size must be an int >= 2, got {self.size!r}")
        gym = _import_gym()
        try:
            data = gym.create_dataset(self.dataset, size=self.size, seed=self.seed, **self.config)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(
                f"ReasoningGymTask.dataset/config rejected by reasoning-gym: {exc}"
            ) from exc
        problems = [
            Problem(
                id=f"{self.dataset}-{i}",
                messages=({"role": "user", "content": str(data[i]["question"]) + _SUFFIX},),
                answer=str(data[i]["answer"]),
                meta={"index": i},
            )
            for i in range(self.size)
        ]
        train, evals = split_rows(problems, self.n_eval, self.seed)
        object.__setattr__(self, "_data", data)
        self._set_splits(train, evals)

    @property
    def name(self) -> str:
        return f"gym:{self.dataset}"

    def verify(self, problem: Problem, response: str) -> Verdict:
        tags = _TAG.findall(response)
        if not tags:
            return Verdict(0.0, "No <answer></answer> tag was found.")
        entry = self._data[int(problem.meta["index"])]
        score = float(self._data.score_answer(answer=tags[-1].strip(), entry=entry))
        score = min(1.0, max(0.0, score))
        return Verdict(score, None if score >= 1.0 else "The answer is not correct.")
