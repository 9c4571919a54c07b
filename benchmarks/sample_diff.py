"""What changed between two runs' test samples, problem by problem.

Both files are `mopd eval --samples` output on the same problems (the learning driver
keeps one per run in `results/<round>/<setting>/samples/`). A mean@k difference says how
much; this says where: which problems gained or lost successes, and whether the answers'
length or their share cut at the token limit moved with them.

    python benchmarks/sample_diff.py BEFORE.jsonl AFTER.jsonl --limit 128 [--show 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_samples(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a samples file by problem id."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["problem_id"]: row for row in rows}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def compare(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], limit: int
) -> dict[str, Any]:
    """Per problem successes and mean tokens before/after, and totals over all problems."""
    if set(before) != set(after):
        missing = sorted(set(before) ^ set(after))[:3]
        raise ValueError(f"the files hold different problems, e.g. {missing}")
    problems = []
    for pid in before:
        b, a = before[pid], after[pid]
        problems.append(
            {
                "problem": pid,
                "successes": (
                    sum(r >= 0.5 for r in b["rewards"]),
                    sum(r >= 0.5 for r in a["rewards"]),
                ),
                "samples": len(b["rewards"]),
                "tokens": (_mean(b["response_tokens"]), _mean(a["response_tokens"])),
            }
        )

    def share_cut(rows: dict[str, dict[str, Any]]) -> float:
        lengths = [t for row in rows.values() for t in row["response_tokens"]]
        return sum(t >= limit for t in lengths) / len(lengths)

    gained = [p for p in problems if p["successes"][1] > p["successes"][0]]
    lost = [p for p in problems if p["successes"][1] < p["successes"][0]]
    return {
        "problems": problems,
        "gained": gained,
        "lost": lost,
        "cut": (share_cut(before), share_cut(after)),
        "tokens": tuple(_mean([p["tokens"][i] for p in problems]) for i in (0, 1)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--limit", type=int, required=True, help="the runs' max new tokens")
    parser.add_argument("--show", type=int, default=0, help="print this many changed answers")
    args = parser.parse_args(argv)
    before, after = read_samples(args.before), read_samples(args.after)
    diff = compare(before, after, args.limit)
    print(
        f"problems: {len(diff['problems'])}; gained successes: {len(diff['gained'])}; "
        f"lost: {len(diff['lost'])}"
    )
    print(
        f"mean answer tokens {diff['tokens'][0]:.1f} -> {diff['tokens'][1]:.1f}; "
        f"cut at {args.limit}: {diff['cut'][0]:.2f} -> {diff['cut'][1]:.2f}"
    )
    print("\n| problem | successes | mean tokens |\n|---|---|---|")
    for p in diff["gained"] + diff["lost"]:
        n, (s0, s1), (t0, t1) = p["samples"], p["successes"], p["tokens"]
        print(f"| {p['problem']} | {s0}/{n} -> {s1}/{n} | {t0:.0f} -> {t1:.0f} |")
    for p in (diff["gained"] + diff["lost"])[: args.show]:
        pid = p["problem"]
        print(f"\n## {pid}\nbefore:\n{before[pid]['texts'][0]}\nafter:\n{after[pid]['texts'][0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
