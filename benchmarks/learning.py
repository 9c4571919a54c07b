"""Learning benchmark: GRPO against peer-conditioned methods at a matched budget, in rounds.

Round 2 (`R2`, SmolLM2-135M-Instruct): GRPO against objectives that keep the verifier's
sign (signed and contrastive peer credit, a GRPO-dominant mix, distillation of failures
only), the paper-faithful MOPD-2S1F and its random-peer control. The 1.5B round (`R3`,
Qwen2.5-Coder-1.5B-Instruct with LoRA): GRPO, MOPD-2S1F in the paper's and in the
multi-turn layout, signed credit and its teacher-free control, on two-digit
multiplication and on HumanEval.

In a round every method trains the same model with the same prompts, group size, steps,
token limit and optimizer settings; only the loss (and its teacher context) differs.
Learning rates are searched on a validation split (seed 0) for GRPO and each searched
family; variants share their family's rate, and a setting may take its rates from
another setting's grid (`Round.lr_from`). The chosen runs are reported on a separate
test split, paired by seed with GRPO (a seed fixes the problem order and the sampling).
Round 1 (8 steps, the loss at temperature 1, the mix weighting bug) is kept in
`results/learning/` and the script that made it in git history.

The benchmark is a list of runs, each a `mopd train` followed by a `mopd eval` of its
final checkpoint on the test split (a LoRA run's adapter on its base model, exactly the
trained student), in its own process. A finished run leaves a small
record in `benchmarks/results/<round folder>/<setting>/<run>.json` and its test samples in
`.../<setting>/samples/<run>.jsonl` (both kept in git), and a LoRA run its final adapter
in `benchmarks/runs/<round folder>/<setting>/adapters/<run>/` (not in git: for later
analysis); anything without a record is (re)started, from its last checkpoint when there
is one. So it can be stopped at any time and continued later, in as many parts as needed:

    python benchmarks/learning.py run --setting add1 --max-runs 3   # do some runs
    python benchmarks/learning.py status --setting add1             # what is left
    python benchmarks/learning.py report                            # tables + plots

The untrained student's validation score (step 0) is measured by the first run of each
seed and copied into the others' records (`step0_from`), which skip it (`eval.at_start`).

`run` does the learning-rate search first, then seed 0 of every method, then the seeds
of base, GRPO and the peer methods with the best seed-0 validation, then the rest
(`plan`), so a partial benchmark holds the comparisons that matter first.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # records: <round folder>/<setting>/<run>.json (kept in git)
RUNS = HERE / "runs"  # checkpoints while a run is in progress (not in git)
N_VALIDATION, N_TEST = 20, 40
FEW_SEEDS, ALL_SEEDS = (0, 1, 2), (0, 1, 2, 3, 4)
EVAL_K = 4
METRIC = f"mean@{EVAL_K}"  # the test and validation score every comparison uses


@dataclass(frozen=True)
class Round:
    """One benchmark: a model, a matched budget, task settings and the compared methods.

    settings: name -> (task factory in bench_tasks, its options, recipe sections that
        differ from `common` in this setting, merged key by key).
    common: the recipe every method shares (the matched budget).
    methods: name -> (overrides, learning-rate family); a family's seed-0 grid picks its rate.
    searched: the families whose grid runs; controls: 3 seeds, run next to the best.
    seeds: of base, GRPO and the `best` peer methods (by validation); FEW_SEEDS for the rest.
    lr_from: setting -> the setting whose seed-0 grid picks its rates (no grid of its own):
        one search serves a setting whose runs cost several times more.
    sensitivity: setting -> (method, rate) pairs run on seeds 0-2 after every other run
        although the grid chose another rate: whether a paired comparison holds when the
        baseline takes its runner-up rate (a small validation split picks rates noisily).
    """

    folder: str
    model: str
    settings: dict[str, tuple[str, dict[str, Any], dict[str, dict[str, Any]]]]
    common: dict[str, dict[str, Any]]
    methods: dict[str, tuple[list[str], str]]
    searched: tuple[str, ...]
    controls: tuple[str, ...]
    lr_grid: tuple[float, ...]
    best: int = 2
    seeds: tuple[int, ...] = ALL_SEEDS
    lr_from: dict[str, str] = field(default_factory=dict)
    sensitivity: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for target, source in self.lr_from.items():
            if target not in self.settings or source not in self.settings:
                problems.append(f"lr_from names an unknown setting: {target} -> {source}")
            elif source in self.lr_from:
                problems.append(f"lr_from source {source} has no grid of its own")
        for setting, pairs in self.sensitivity.items():
            if setting not in self.settings:
                problems.append(f"sensitivity names an unknown setting: {setting}")
            if any(m not in self.methods or lr not in self.lr_grid for m, lr in pairs):
                problems.append(f"sensitivity runs must be methods at grid rates: {pairs}")
        if "grpo" not in self.methods:
            problems.append("no 'grpo' method to pair with")
        if not set(self.searched) | set(self.controls) <= set(self.methods):
            problems.append("searched and controls must be methods")
        families = {family for _, family in self.methods.values()}
        if not families <= set(self.searched):
            problems.append(f"families without a grid: {sorted(families - set(self.searched))}")
        recipes = [self.common, *(s[2] for s in self.settings.values())]
        if any("task" in r or "name" in r.get("model", {}) for r in recipes):
            problems.append("recipe sections may not set the task or the model's name")
        if self.common.get("eval", {}).get("k", EVAL_K) != EVAL_K:
            problems.append(f"eval.k must be {EVAL_K} (records are read as mean@{EVAL_K})")
        if not set(FEW_SEEDS) <= set(self.seeds):
            problems.append(f"seeds must include {FEW_SEEDS}")
        if problems:
            raise ValueError(f"round {self.folder}: " + "; ".join(problems))

    @property
    def peer_methods(self) -> tuple[str, ...]:
        """The peer-conditioned methods: candidates for all seeds."""
        return tuple(m for m in self.methods if m not in ("grpo", *self.controls))

    def grid_setting(self, setting: str) -> str:
        """The setting whose seed-0 grid picks `setting`'s learning rates."""
        return self.lr_from.get(setting, setting)


# The teacher layout of the new peer-conditioned methods, chosen from the teacher-signal
# diagnostics (docs/benchmarks.md); MOPD-2S1F and its control keep the paper's.
LAYOUT = "teacher.layout=multi-turn"
SMOLLM = "packaged:smollm2-135m-instruct"
QWEN = "packaged:qwen2.5-coder-1.5b-instruct"

R2 = Round(
    folder="learning-r2",
    model=SMOLLM,
    settings={
        # One-digit addition: the student solves about half; 2S contexts rank rollouts
        # better than the plain question (teacher-signal table in docs/benchmarks.md).
        "add1": (
            "bench_tasks:make_arithmetic",
            {"digits": 1, "terms": 2, "operators": "+", "n_train": 40},
            {},
        ),
        # Two-digit addition: successes are rare (about 10% of rollouts, docs/benchmarks.md).
        "add2": (
            "bench_tasks:make_arithmetic",
            {"digits": 2, "terms": 2, "operators": "+", "n_train": 200},
            {},
        ),
    },
    # The matched budget: identical for every method (twice round 1's 8 steps x 2 prompts).
    common={
        "rollout": {"n": 8, "temperature": 0.7, "max_new_tokens": 32},
        "train": {
            "steps": 16,
            "prompts_per_step": 2,
            "micro_batch_size": 16,
            "checkpoint_every": 4,
        },
        "optim": {"warmup_steps": 2},
        "eval": {"every": 8, "k": 4, "temperature": 0.6, "top_p": 0.95},
        "logging": {"progress": False},
    },
    methods={
        "grpo": (["method=grpo"], "grpo"),
        "mopd-2s1f": (["method=mopd"], "mopd-2s1f"),
        "random_peer": (["method=mopd", "peers.control=random_peer"], "mopd-2s1f"),
        "signed-credit": (["method=mopd", "loss.kind=signed-credit", LAYOUT], "signed-credit"),
        "contrastive-credit": (
            ["method=mopd", "loss.kind=contrastive-credit", LAYOUT],
            "contrastive-credit",
        ),
        # GRPO-dominant (the SDPO paper's small-model recipe): shares GRPO's rate.
        "grpo+distill0.1": (
            ["method=mopd", "loss.kind=grpo+distill", "loss.grpo_mix=0.1", LAYOUT],
            "grpo",
        ),
        "distill-failures": (
            ["method=mopd", "loss.kind=distill-failures", LAYOUT],
            "mopd-2s1f",
        ),
        # signed-credit's weights without a teacher: does its per-token information matter?
        "sign-scaled": (["method=grpo", "loss.kind=sign-scaled"], "signed-credit"),
    },
    searched=("grpo", "mopd-2s1f", "signed-credit", "contrastive-credit"),
    controls=("sign-scaled",),
    lr_grid=(5e-6, 2e-5, 8e-5),
)
# The 1.5B round. Sized to about 12 hours of this machine with one driver at a time (a
# MOPD code step peaked at 22.7 GiB with micro-batches of 4 on a 24 GiB machine: 2 here):
# 2 threads per run, LoRA r16 in bf16, evaluations only before and after training. The
# rate grid runs on arithmetic, whose steps are a fraction of code's, and serves both
# settings; at 135M every searched family picked the same rate in both settings but one
# (docs/benchmarks.md, round 2).
WIDE_CLIP = "loss.credit_clip=0.5"  # the 1.5B teacher ranks rollouts: let it move weights more
R3 = Round(
    folder="learning-qwen1.5b",
    model=QWEN,
    settings={
        # Two-digit multiplication: the untrained model answers in about 5 tokens and gets
        # 56% right (mean@4 on 20 eval prompts, docs/benchmarks.md).
        "arith": (
            "bench_tasks:make_arithmetic",
            {"digits": 2, "terms": 2, "operators": "*", "n_train": 200},
            {"rollout": {"max_new_tokens": 32}, "train": {"steps": 24, "checkpoint_every": 8}},
        ),
        # 12 steps: after 6, GRPO and MOPD-2S1F in both layouts (seed 0) scored exactly the
        # base's validation mean@4, and a multi-turn student was 2.2e-4 nats per token
        # (KL) from the base.
        "code": (
            "bench_tasks:make_humaneval",
            {},
            {"rollout": {"max_new_tokens": 128}, "train": {"steps": 12}},
        ),
    },
    common={
        "model": {"dtype": "bfloat16", "lora": {"r": 16}},
        "rollout": {"n": 8, "temperature": 0.7},
        "train": {
            "steps": 6,
            "prompts_per_step": 2,
            "micro_batch_size": 2,
            "checkpoint_every": 2,
            "threads": 2,
        },
        "optim": {"warmup_steps": 1},
        "eval": {"every": 0, "k": 4, "temperature": 0.6, "top_p": 0.95},
        "logging": {"progress": False},
    },
    methods={
        "grpo": (["method=grpo"], "grpo"),
        "mopd-2s1f": (["method=mopd"], "mopd-2s1f"),
        "mopd-multi-turn": (["method=mopd", LAYOUT], "mopd-2s1f"),
        # The paper layout: signed credit needs only the teacher's ranking, and the
        # paper layout ranks 2S1F rollouts best at 1.5B (AUC 0.98 vs 0.78 multi-turn).
        "signed-credit": (
            ["method=mopd", "loss.kind=signed-credit", WIDE_CLIP],
            "signed-credit",
        ),
        "sign-scaled": (["method=grpo", "loss.kind=sign-scaled", WIDE_CLIP], "signed-credit"),
    },
    searched=("grpo", "mopd-2s1f", "signed-credit"),
    controls=("sign-scaled",),
    lr_grid=(2e-5, 1e-4),
    best=0,
    seeds=FEW_SEEDS,
    lr_from={"code": "arith"},
    # GRPO's grid chose 2e-5 by one validation point (0.475 against 0.4375 at 1e-4), and
    # the sign-safe objectives it is compared with train at 1e-4. On code the rate turned
    # out to be the whole difference (GRPO at 1e-4 is level with them), so both are paired.
    sensitivity={"arith": (("grpo", 1e-4),), "code": (("grpo", 1e-4),)},
)
ROUNDS = {"r2": R2, "qwen": R3}
SETTINGS: dict[str, Round] = {name: r for r in ROUNDS.values() for name in r.settings}
assert len(SETTINGS) == sum(len(r.settings) for r in ROUNDS.values()), "setting names repeat"
assert len({r.folder for r in ROUNDS.values()}) == len(ROUNDS), "round folders repeat"


def round_of(setting: str) -> Round:
    return SETTINGS[setting]


def recipe_of(setting: str) -> dict[str, dict[str, Any]]:
    """The round's common recipe with the setting's own sections merged in."""
    r = round_of(setting)
    recipe: dict[str, dict[str, Any]] = {"model": {"name": r.model}}
    for section, values in [*r.common.items(), *r.settings[setting][2].items()]:
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


@dataclass(frozen=True)
class Run:
    setting: str
    method: str  # a key of its round's methods, or "base" (no training: test evaluation only)
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.lr:g}-s{self.seed}"

    @property
    def record(self) -> Path:
        return RESULTS / round_of(self.setting).folder / self.setting / f"{self.name}.json"

    @property
    def run_dir(self) -> Path:
        return RUNS / round_of(self.setting).folder / self.setting / self.name

    @property
    def samples(self) -> Path:
        """Every test sample of the run (`mopd eval --samples`)."""
        return self.record.parent / "samples" / f"{self.name}.jsonl"

    @property
    def kept_adapter(self) -> Path:
        return self.run_dir.parent / "adapters" / self.name


# ------------------------------------------------------------------ planning


def _records(setting: str) -> dict[str, dict[str, Any]]:
    folder = RESULTS / round_of(setting).folder / setting
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def chosen_lr(setting: str, method: str) -> float | None:
    """Best final validation mean@k of the family's seed-0 grid; None until it is complete."""
    r = round_of(setting)
    source = r.grid_setting(setting)
    records = _records(source)
    grid, searched = r.lr_grid, r.methods[method][1]
    scores = {}
    for lr in grid:
        rec = records.get(Run(source, searched, lr, 0).name)
        if rec is None:
            return None
        scores[lr] = rec["validation"][-1][METRIC]
    return max(grid, key=lambda lr: (scores[lr], -lr))  # ties: the smaller step


def _final_validation(setting: str, method: str, seeds: tuple[int, ...]) -> float | None:
    """Mean final validation mean@k over `seeds`; None until all of them are recorded."""
    lr = chosen_lr(setting, method)
    records = _records(setting)
    names = [Run(setting, method, lr, s).name for s in seeds] if lr is not None else []
    if not names or any(n not in records for n in names):
        return None
    return sum(records[n]["validation"][-1][METRIC] for n in names) / len(names)


def best_peer_methods(setting: str) -> list[str] | None:
    """The round's `best` peer-conditioned methods with the best validation score over seeds 0-2
    (validation, not test: the choice of who gets more seeds must not peek at the test)."""
    peers = round_of(setting).peer_methods
    scores = {m: _final_validation(setting, m, FEW_SEEDS) for m in peers}
    if any(v is None for v in scores.values()):
        return None
    return sorted(peers, key=lambda m: -scores[m])[: round_of(setting).best]  # type: ignore[operator]


def seeds_of(setting: str, method: str) -> tuple[int, ...]:
    """The round's seeds for base, GRPO and the best peer methods (once known), else 3."""
    seeds = round_of(setting).seeds
    if method in ("base", "grpo") or method in (best_peer_methods(setting) or []):
        return seeds
    return tuple(s for s in FEW_SEEDS if s in seeds)


def _seed0_validation(setting: str, method: str) -> float:
    """Final validation mean@k of the method's seed-0 run at its chosen rate (-1: none yet)."""
    lr = chosen_lr(setting, method)
    record = _records(setting).get(Run(setting, method, lr, 0).name) if lr is not None else None
    return record["validation"][-1][METRIC] if record else -1.0


def plan(setting: str) -> list[Run]:
    """Every run of the benchmark that can be planned now, in execution order: the grid,
    then seed 0 of every method; then seeds 1-2 of base, GRPO, the three peer methods
    with the best seed-0 validation and the controls, then those of the others; then
    seeds 3-4. The order
    only decides what a partial benchmark holds first (the paired comparisons that
    matter); which runs exist is fixed by the protocol (`seeds_of`)."""
    r = round_of(setting)
    runs = (
        [Run(setting, m, lr, 0) for m in r.searched for lr in r.lr_grid]
        if r.grid_setting(setting) == setting
        else []
    )
    ranked = sorted(r.peer_methods, key=lambda m: -_seed0_validation(setting, m))
    first = ("base", "grpo", *ranked[:3], *r.controls)
    phases = [
        ((0,), ("base", *r.methods)),
        ((1, 2), first),
        ((1, 2), ranked[3:]),
        (tuple(s for s in r.seeds if s not in FEW_SEEDS), ("base", *r.methods)),
    ]
    for seeds, methods in phases:
        for seed in seeds:
            for method in methods:
                lr = 0.0 if method == "base" else chosen_lr(setting, method)
                if lr is not None and seed in seeds_of(setting, method):
                    runs.append(Run(setting, method, lr, seed))
    for method, lr in r.sensitivity.get(setting, ()):
        if chosen_lr(setting, method) is not None:  # after the grid: a rate it did not choose
            runs += [Run(setting, method, lr, seed) for seed in FEW_SEEDS]
    return list(dict.fromkeys(runs))


# ------------------------------------------------------------------ running


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    return env


def _mopd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mopd.cli", *args], check=True, env=_env())


def _recipe(setting: str) -> Path:
    r = round_of(setting)
    factory, options, _ = r.settings[setting]
    recipe = {
        **recipe_of(setting),
        "task": {
            "name": factory,
            "options": {
                **options,
                "split": "validation",
                "n_validation": N_VALIDATION,
                "n_test": N_TEST,
            },
        },
    }
    path = RUNS / r.folder / setting / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _validation_curve(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    key = f"eval/mean@{EVAL_K}"
    return [
        {
            "step": r["step"],
            METRIC: r[key],
            f"pass@{EVAL_K}": r[f"eval/pass@{EVAL_K}"],
            "response_tokens": r.get("eval/response_tokens_mean"),
        }
        for r in rows
        if key in r
    ]


TRAIN_METRICS = (
    "time/step",
    "rollout/success_rate",
    "rollout/response_tokens_mean",
    "rollout/truncated_fraction",
    "teacher/context_fraction",
    "teacher/truncated_fraction",
    "teacher/success_auc",
    "gap/success",
    "gap/failure",
    "grpo/clip_fraction",
    "credit/weight_mean",
    "credit/clipped_fraction",
    "optim/skipped",
)


def _step0_source(run: Run) -> tuple[str, dict[str, Any], str | None] | None:
    """A finished run of the same setting and seed with its step-0 validation, if any.

    Step 0 evaluates the untrained student: the same model (LoRA's B starts at 0), the
    same prompts and the same sampling seed (from `train.seed`) for every method of a
    setting, so one measurement per seed serves them all (the 1.5B arith round's runs
    scored it identically within each seed)."""
    for name, record in _records(run.setting).items():
        first = (record.get("validation") or [{}])[0]
        if record["seed"] == run.seed and first.get("step") == 0 and "step0_from" not in first:
            return name, first, record.get("commit")
    return None


def _train(run: Run) -> tuple[float, list[dict[str, float]], dict[str, float]]:
    """Train (or continue) the run; returns wall seconds, validation curve, train means."""
    t0 = time.time()
    latest = run.run_dir / "checkpoints" / "latest"
    source = _step0_source(run)
    if latest.exists():
        _mopd("train", "--resume", str(run.run_dir))
    else:
        shutil.rmtree(run.run_dir, ignore_errors=True)
        _mopd(
            "train",
            "--config",
            str(_recipe(run.setting)),
            *round_of(run.setting).methods[run.method][0],
            f"optim.lr={run.lr}",
            f"train.seed={run.seed}",
            f"logging.output_dir={run.run_dir.parent}",
            f"logging.run_name={run.name}",
            *(["eval.at_start=false"] if source else []),
        )
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    means = {}
    for key in TRAIN_METRICS:  # mean over the steps that logged a value (AUC needs mixed groups)
        values = [r[key] for r in steps if r.get(key) is not None]
        if values:
            means[key] = sum(values) / len(values)
    curve = _validation_curve(run.run_dir)
    if source and (not curve or curve[0]["step"] != 0):  # measured once for the seed
        curve.insert(0, {**source[1], "step0_from": source[0], "step0_commit": source[2]})
    return time.time() - t0, curve, means


def _test_eval(run: Run, model: str) -> tuple[float, dict[str, Any]]:
    t0 = time.time()
    out = run.run_dir / "test_eval.json"
    _mopd(
        "eval",
        "--model",
        model,
        *_test_eval_args(run.setting),
        "--seed",
        str(run.seed),
        "--output",
        str(out),
        "--samples",
        str(run.samples),
        *_test_task_options(run.setting),
    )
    result = json.loads(out.read_text())["results"][0]
    tokens = result["metrics"]["eval/response_tokens_mean"]
    return time.time() - t0, {**result["overall"], "response_tokens_mean": tokens}


def _test_eval_args(setting: str) -> list[str]:
    """`mopd eval` sampling of the test split: exactly the validation's (the recipe's eval
    settings as the trainer resolves them, library defaults included)."""
    from mopd.config import load_config

    cfg = load_config(_recipe(setting))
    return [
        "--task",
        round_of(setting).settings[setting][0],
        "--k",
        str(cfg.eval.k),
        "--temperature",
        str(cfg.eval.temperature),
        "--top-p",
        str(cfg.eval.top_p),
        "--max-new-tokens",
        str(cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens),
        "--dtype",
        cfg.model.dtype,
        "--batch-size",
        str(cfg.rollout.batch_size),
        *(["--threads", str(cfg.train.threads)] if cfg.train.threads else []),
    ]


def _test_task_options(setting: str) -> list[str]:
    options = {
        **round_of(setting).settings[setting][1],
        "n_validation": N_VALIDATION,
        "n_test": N_TEST,
    }
    # JSON is YAML: a string such as "*" reaches the task as itself, not as a YAML alias.
    return ["split=test", *(f"{k}={json.dumps(v)}" for k, v in options.items())]


def _claim(run: Run) -> tuple[Run, Any] | None:
    """An exclusive lock on `run` for this driver, or None if another driver holds it:
    several drivers of one setting then share its runs (one per core)."""
    path = run.run_dir.parent / f".{run.name}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    if run.record.exists():  # finished by another driver since the plan was read
        handle.close()
        return None
    return run, handle


def _head() -> str | None:
    """The checked-out commit (short), or None outside a git checkout."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    )
    return head.stdout.strip() or None


def execute(run: Run) -> None:
    record: dict[str, Any] = {"setting": run.setting, "method": run.method, "lr": run.lr}
    record["seed"] = run.seed
    # The commit the run started from (kept across resumes): the code that trained it.
    started = run.run_dir / "commit"
    if not started.exists():
        run.run_dir.mkdir(parents=True, exist_ok=True)
        started.write_text(f"{_head() or ''}\n")
    if run.method == "base":
        model, record["train_wall_s"], record["validation"] = round_of(run.setting).model, 0.0, []
    else:
        trained = run.run_dir / "trained.json"  # a retry after a failed test eval skips training
        if not trained.exists():
            wall, curve, means = _train(run)
            data = {"train_wall_s": wall, "validation": curve, "train_means": means}
            trained.write_text(json.dumps(data))
        record.update(json.loads(trained.read_text()))
        latest = (run.run_dir / "checkpoints" / "latest").read_text().strip()
        final = run.run_dir / "checkpoints" / latest
        # A LoRA student is tested as trained, adapter on its base: the merged bf16 copy
        # rounds W + s·B·A and drops most of a short run's update (docs/benchmarks.md).
        model = str(final / "adapter" if (final / "adapter").is_dir() else final / "student")
        record["test_model"] = Path(model).name
    record["test_wall_s"], record["test"] = _test_eval(run, model)
    record["load_average"] = os.getloadavg()
    record["commit"] = started.read_text().strip() or None
    if (tested := _head()) != record["commit"]:  # the checkout moved on during the run
        record["commit_tested"] = tested
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run.record.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.record.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run.record)
    if Path(model).name == "adapter":  # 74 MB at 1.5B, r16; the checkpoints are ~2 GB each
        shutil.rmtree(run.kept_adapter, ignore_errors=True)
        run.kept_adapter.parent.mkdir(parents=True, exist_ok=True)
        os.replace(model, run.kept_adapter)  # a rename: same file system
    shutil.rmtree(run.run_dir, ignore_errors=True)


# ------------------------------------------------------------------ reporting

# Two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval over seeds (nan for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def _fmt(mean: float, half: float) -> str:
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def _test_metric(records: list[dict[str, Any]], name: str) -> str:
    """Mean ± t-interval over seeds; with one seed, its prompt-level bootstrap interval."""
    if len(records) == 1:
        stat = records[0]["test"]["metrics"][name]
        return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"
    return _fmt(*mean_ci([r["test"]["metrics"][name]["mean"] for r in records]))


def _test_value(record: dict[str, Any], name: str) -> float:
    return float(record["test"]["metrics"][name]["mean"])


def paired_difference(
    setting: str, method: str, name: str, against: tuple[str, float] | None = None
) -> dict[str, Any] | None:
    """Test `name` of `method` minus GRPO's (or that of `against`, a method at a rate),
    paired by seed: mean, 95% t-interval, seeds; both at their chosen rates otherwise.

    A seed fixes the training problems' order and every sampling draw, so the pair shares
    everything but the objective; the interval is over the per-seed differences.
    """
    other, lr_other = against or ("grpo", chosen_lr(setting, "grpo"))
    lr = 0.0 if method == "base" else chosen_lr(setting, method)
    if lr is None or lr_other is None or (method, lr) == (other, lr_other):
        return None
    records = _records(setting)
    diffs, seeds = [], []
    for seed in round_of(setting).seeds:
        mine, theirs = Run(setting, method, lr, seed).name, Run(setting, other, lr_other, seed).name
        if mine in records and theirs in records:
            diffs.append(_test_value(records[mine], name) - _test_value(records[theirs], name))
            seeds.append(seed)
    if not diffs:
        return None
    mean, half = mean_ci(diffs)
    return {"mean": mean, "half_width": half, "seeds": seeds, "diffs": diffs}


def _mean_of(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{sum(present) / len(present):.3f}" if present else "n/a"


def _row(method: str, lr: float, recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method at one rate over its recorded seeds: test results and training means."""
    return {
        "method": method,
        "lr": lr,
        "seeds": [x["seed"] for x in recs],
        "test_mean": _test_metric(recs, METRIC),
        "test_pass1": _test_metric(recs, "pass@1"),
        "test_passk": _test_metric(recs, f"pass@{EVAL_K}"),
        "train_wall_s": sum(x["train_wall_s"] for x in recs) / len(recs),
        "test_tokens": _mean_of([x["test"].get("response_tokens_mean") for x in recs]),
        **{
            key: _mean_of([x.get("train_means", {}).get(key) for x in recs])
            for key in TRAIN_METRICS
        },
        "curves": [x["validation"] for x in recs],
        "train_means": [x.get("train_means", {}) for x in recs],
    }


def summarize(setting: str) -> dict[str, Any]:
    records, r = _records(setting), round_of(setting)
    own_grid = r.grid_setting(setting) == setting  # else its seed-0 runs are not a search
    search = [
        {"method": m, "lr": lr, "validation": records[Run(setting, m, lr, 0).name]["validation"]}
        for m in r.searched
        for lr in r.lr_grid
        if own_grid and Run(setting, m, lr, 0).name in records
    ]
    rows = []
    for method in ("base", *r.methods):
        lr = 0.0 if method == "base" else chosen_lr(setting, method)
        if lr is None:
            continue
        recs = [records[n] for s in r.seeds if (n := Run(setting, method, lr, s).name) in records]
        if recs:
            rows.append(
                {**_row(method, lr, recs), "vs_grpo": paired_difference(setting, method, METRIC)}
            )
    sensitivity = []
    for method, lr in r.sensitivity.get(setting, ()):
        recs = [records[n] for s in FEW_SEEDS if (n := Run(setting, method, lr, s).name) in records]
        if recs and lr != chosen_lr(setting, method):
            against = {
                row["method"]: paired_difference(setting, row["method"], METRIC, (method, lr))
                for row in rows
            }
            sensitivity.append({**_row(method, lr, recs), "against": against})
    return {"setting": setting, "search": search, "methods": rows, "sensitivity": sensitivity}


def _lr_cell(row: dict[str, Any]) -> str:
    return "—" if row["method"] == "base" else f"{row['lr']:g}"


def _markdown(summary: dict[str, Any]) -> str:
    lines = [f"### Setting `{summary['setting']}`", ""]
    if summary["search"]:
        lines += ["Learning-rate search (seed 0, validation mean@4 at the last step):", ""]
        lines += ["| method | lr | validation mean@4 |", "|---|---:|---:|"]
        for s in summary["search"]:
            lines.append(f"| {s['method']} | {s['lr']:g} | {s['validation'][-1]['mean@4']:.3f} |")
        lines.append("")
    lines += [
        "Test split: mean over seeds ± half-width of the 95% t-interval over seeds; with a "
        "single seed, [95% bootstrap interval over the test prompts]. Train wall: the "
        "driver's training time since the run last started or resumed (s/step below is "
        "the whole run's).",
        "",
        "| method | lr | seeds | test mean@4 | minus GRPO (paired) | test pass@1 | test pass@4 "
        "| train wall s/run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["methods"]:
        lr = _lr_cell(r)
        diff = r.get("vs_grpo")
        paired = "—" if diff is None else _fmt(diff["mean"], diff["half_width"])
        lines.append(
            f"| {r['method']} | {lr} | {len(r['seeds'])} | {r['test_mean']} | {paired} | "
            f"{r['test_pass1']} | {r['test_passk']} | {r['train_wall_s']:.0f} |"
        )
    lines += [
        "",
        "What happened in training (means over the steps and seeds of the runs above, and "
        "of each rate check, named with its rate; n/a: not recorded for those runs):",
        "",
        "| method | rollout success | response tokens | truncated | test response tokens "
        "| context fraction | teacher AUC | gap success | gap failure | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rate_checks = [{**s, "method": f"{s['method']} at {s['lr']:g}"} for s in summary["sensitivity"]]
    for r in summary["methods"] + rate_checks:
        if r["method"] == "base":
            continue
        cells = [
            r["rollout/success_rate"],
            r["rollout/response_tokens_mean"],
            r["rollout/truncated_fraction"],
            r["test_tokens"],
            r["teacher/context_fraction"],
            r["teacher/success_auc"],
            r["gap/success"],
            r["gap/failure"],
            r["time/step"],  # unlike the wall column, whole for a resumed run
        ]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    for s in summary["sensitivity"]:
        lines += [
            "",
            f"{s['method']} at {s['lr']:g}, a rate the grid did not choose ({len(s['seeds'])} "
            f"seeds): test mean@4 {s['test_mean']}. Each method at its chosen rate minus it, "
            "paired by seed:",
            "",
            f"| method | lr | minus {s['method']} at {s['lr']:g} (paired) |",
            "|---|---:|---:|",
        ]
        for r in summary["methods"]:
            diff = s["against"].get(r["method"])
            if diff is not None:
                paired = _fmt(diff["mean"], diff["half_width"])
                lines.append(f"| {r['method']} | {_lr_cell(r)} | {paired} |")
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in summary["methods"]:
        if not r["curves"] or not r["curves"][0]:
            continue
        steps = [p["step"] for p in r["curves"][0]]
        n = min(len(c) for c in r["curves"])
        stats = [mean_ci([c[i][METRIC] for c in r["curves"]]) for i in range(n)]
        means = [m for m, _ in stats]
        (line,) = ax.plot(
            steps[:n], means, marker="o", label=f"{r['method']} ({len(r['curves'])} seeds)"
        )
        if len(r["curves"]) > 1:  # 95% t-interval over seeds
            low = [m - h for m, h in stats]
            high = [m + h for m, h in stats]
            ax.fill_between(steps[:n], low, high, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation mean@{EVAL_K} (band: 95% CI over seeds)")
    ax.set_title(f"Validation curves, setting {summary['setting']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report() -> None:
    """Per round: `<setting>.summary.json`, `<setting>.png` and `learning.md` (all settings)."""
    for r in ROUNDS.values():
        folder, parts = RESULTS / r.folder, []
        for setting in r.settings:
            if not (folder / setting).exists():
                continue
            summary = summarize(setting)
            (folder / f"{setting}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            _plot(summary, folder / f"{setting}.png")
            parts.append(_markdown(summary))
        if parts:
            (folder / "learning.md").write_text("\n".join(parts))
            print("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "status"):
        p = sub.add_parser(name)
        p.add_argument("--setting", choices=sorted(SETTINGS), default="add1")
        p.add_argument(
            "--seeds",
            type=lambda text: {int(x) for x in text.split(",")},
            default=None,
            help="only runs of these seeds, e.g. 2",
        )
        p.add_argument(
            "--methods",
            type=lambda text: set(text.split(",")),
            default=None,
            help="only runs of these methods, e.g. grpo (splits the lr search over drivers)",
        )
        p.add_argument(
            "--lrs",
            type=lambda text: {float(x) for x in text.split(",")},
            default=None,
            help="only runs at these learning rates, e.g. 1e-4 (base runs at 0)",
        )
        if name == "run":
            p.add_argument("--max-runs", type=int, default=None, help="stop after this many")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if args.command == "report":
        report()
        return 0
    known = ["base", *round_of(args.setting).methods]
    if args.methods is not None and not args.methods <= set(known):
        unknown = sorted(args.methods - set(known))
        parser.error(f"unknown method(s) {unknown} in {args.setting}; known: {', '.join(known)}")
    rates = {0.0, *round_of(args.setting).lr_grid}
    if args.lrs is not None and not args.lrs <= rates:
        parser.error(f"--lrs {sorted(args.lrs - rates)} not in the grid: {sorted(rates)}")
    done = 0
    while True:
        todo = [r for r in plan(args.setting) if not r.record.exists()]
        if args.seeds is not None:
            todo = [r for r in todo if r.seed in args.seeds]
        if args.methods is not None:
            todo = [r for r in todo if r.method in args.methods]
        if args.lrs is not None:
            todo = [r for r in todo if r.lr in args.lrs]
        if args.command == "status":
            print(
                f"{len(todo)} runs to do now (the extra seeds of the best peer methods are "
                "planned once seeds 0-2 of every method are recorded):"
            )
            print("\n".join(f"  {r.name}" for r in todo))
            return 0
        if args.max_runs is not None and done >= args.max_runs:
            return 0
        claimed = next((c for c in map(_claim, todo) if c is not None), None)
        if claimed is None:  # nothing left, or every remaining run has its driver
            return 0
        run, claim = claimed
        print(f"[{time.strftime('%H:%M:%S')}] {args.setting}/{run.name}", flush=True)
        with claim:
            execute(run)
        done += 1


if __name__ == "__main__":
    sys.exit(main())
