"""Where in a response the teacher disagrees with the student: the gap by token position.

`mopd analyze` stores each rollout's per-token teacher-minus-student log-prob gap in
`scores.jsonl`. A mean gap over tokens can hide a large gap on one token: a teacher that
accepts every answer token but doubts the opening (it would rather start with an
explanation) averages to a small gap on a 5-token answer, yet distilling it moves the
student's first token. This splits the gap of successes and failures into the first
token, the tokens in between and the last token (end-of-turn on complete responses).

    python benchmarks/gap_positions.py ANALYSIS_DIR/scores.jsonl[.gz]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from signal_split import read_scores

PARTS = ("first", "middle", "last")
OUTCOMES = ("success", "failure")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def positions(
    rows: list[dict[str, Any]], threshold: float = 0.5
) -> dict[str, dict[str, dict[str, float]]]:
    """condition -> "success"/"failure" -> part -> mean gap over rollouts.

    The middle is each rollout's mean over its tokens between the first and the last
    (rollouts of one or two tokens have none and are left out of it).
    """
    values: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: {o: {p: [] for p in PARTS} for o in OUTCOMES}
    )
    for row in rows:
        gap = row["gap"]
        if not gap:
            continue
        parts = values[row["condition"]]["success" if row["reward"] >= threshold else "failure"]
        parts["first"].append(gap[0])
        parts["last"].append(gap[-1])
        if len(gap) > 2:
            parts["middle"].append(_mean(gap[1:-1]))
    return {
        cond: {o: {p: _mean(v) for p, v in by_part.items()} for o, by_part in by_outcome.items()}
        for cond, by_outcome in values.items()
    }


def markdown(table: dict[str, dict[str, dict[str, float]]]) -> str:
    head = " | ".join(f"{o} {p}" for o in OUTCOMES for p in PARTS)
    lines = [f"| condition | {head} |", "|---|" + "---:|" * 2 * len(PARTS)]
    for cond, by_outcome in table.items():
        cells = [f"{by_outcome[o][p]:+.2f}" for o in OUTCOMES for p in PARTS]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path)
    print(markdown(positions(read_scores(parser.parse_args(argv).scores))))


if __name__ == "__main__":
    main()
