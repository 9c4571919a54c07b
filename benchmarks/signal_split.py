"""Teacher-signal AUC split by how many successes a prompt's group has.

A success that is alone in its group has no other success to show, so under 1S/2S it is
scored with an emptier context than the failures it is compared with (they see it as
their peer). An AUC gain can then come from the contexts differing, not from the teacher
reading its peers. Prompts with at least two successes give every success a success peer;
comparing the two groups of prompts shows how much of a condition's gain survives.

    python benchmarks/signal_split.py ANALYSIS_DIR/scores.jsonl[.gz]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from mopd.evaluation.metrics import success_auc


def split(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[int, float | None]]]:
    """Per condition: (prompts, mean AUC) over prompts with one success and with two or more."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[row["condition"]][row["problem"]].append(row)
    out = {}
    for condition, problems in groups.items():
        parts: dict[str, list[float]] = {"one success": [], "two or more": []}
        for group in problems.values():
            auc = success_auc([r["score"] for r in group], [r["reward"] for r in group])
            if auc is None:
                continue
            wins = sum(r["reward"] >= 0.5 for r in group)  # success_auc's threshold
            parts["one success" if wins == 1 else "two or more"].append(auc)
        out[condition] = {
            name: (len(v), sum(v) / len(v) if v else None) for name, v in parts.items()
        }
    return out


def read_scores(path: Path) -> list[dict[str, Any]]:
    """The rows of a `mopd analyze` scores.jsonl (or .jsonl.gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scores", type=Path, help="scores.jsonl written by `mopd analyze`")
    args = parser.parse_args(argv)
    table = split(read_scores(args.scores))
    print("| condition | AUC, one success (prompts) | AUC, two or more (prompts) |")
    print("|---|---:|---:|")
    for condition, parts in table.items():
        cells = [
            "n/a" if auc is None else f"{auc:.3f} ({n})"
            for n, auc in (parts["one success"], parts["two or more"])
        ]
        print(f"| {condition} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
