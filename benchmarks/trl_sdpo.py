"""Worker: TRL's `trl.experimental.sdpo.SDPOTrainer` on the setting of `sysbench.Setting`.

Run by `step_time.py --variants ...,trl-sdpo`; needs the `bench` extra (TRL). Matched with
our MOPD step: the same model object (our loader), the same chat prompts in the same order,
G, new-token limit, sampling temperature 1 with no top-p/top-k filtering, loss on the
student's top-100 ids + tail, alpha 0.5 (generalised JSD), EMA teacher at rate 0.05
updated every step, no importance weights, one optimizer step per generation batch
(P*G rows in one forward/backward), AdamW lr/wd/grad-clip as ours, fp32, same torch
thread count, gradient checkpointing as `--grad-ckpt` for both (TRL defaults to on). Not matchable: see docs/benchmarks.md ("Systems benchmark").

Times: per-step wall time between consecutive `on_step_end` callbacks (the whole step:
generation, rewards, teacher and student forwards, backward, optimizer, EMA update), and
inside it the time of `_generate`, `_calculate_rewards` and `compute_loss` (the teacher
and student forwards and the loss; TRL runs them in one function).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections import defaultdict
from typing import Any

import torch
from sysbench import Setting, emit, peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    Setting().add_arguments(parser)
    s = Setting.from_args(parser.parse_args())
    torch.set_num_threads(s.threads)

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    from mopd.models.loading import load_model, load_tokenizer
    from mopd.tasks.arithmetic import ArithmeticTask
    from mopd.training.trainer import training_problems

    if (s.task, s.dtype, s.lora, s.micro_batch) != ("arithmetic", "float32", 0, 0):
        raise SystemExit("the TRL worker runs the fp32 full-weight arithmetic setting only")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(s.model)
    model = load_model(s.model, dtype="float32")
    task = ArithmeticTask(digits=s.digits, terms=s.terms, n_train=60, n_eval=8)
    total = s.warmup + s.steps
    problems = training_problems(
        list(task.train_problems()), seed=s.seed, start=0, count=total * s.prompts
    )
    dataset = Dataset.from_list(
        [{"prompt": [dict(m) for m in p.messages], "pid": i} for i, p in enumerate(problems)]
    )

    def reward(completions: list[Any], pid: list[int], **_: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [task.verify(problems[i], t).reward for i, t in zip(pid, texts, strict=True)]

    args = SDPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-sdpo-"),
        use_cpu=s.device == "cpu" or not torch.cuda.is_available(),
        gradient_checkpointing=bool(s.grad_ckpt),  # TRL's default is True; ours False
        bf16=False,
        fp16=False,
        seed=s.seed,
        max_steps=total,
        per_device_train_batch_size=s.prompts * s.n,
        gradient_accumulation_steps=1,
        num_generations=s.n,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        learning_rate=s.lr,
        weight_decay=0.01,
        max_grad_norm=1.0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        distillation_weight=1.0,
        distillation_mode="topk_logits",
        distillation_topk=s.topk,
        distillation_add_tail=True,
        distillation_alpha=s.alpha,
        distillation_is_clip=None,
        teacher_model_kind="ema",
        teacher_update_rate=0.05,
        teacher_sync_steps=1,
        success_reward_threshold=0.5,
        include_environment_feedback=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    phases: dict[str, float] = defaultdict(float)
    ends: list[float] = []
    cpu_ends: list[float] = []
    records: list[dict[str, float]] = []
    per_step: list[dict[str, float]] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            per_step.append(dict(phases))
            phases.clear()

        def on_log(self, *a: Any, logs: dict[str, float] | None = None, **k: Any) -> None:
            if logs:
                records.append(dict(logs))

    trainer = SDPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    for name, phase in (
        ("_generate", "generate"),
        ("_calculate_rewards", "verify"),
        ("compute_loss", "loss_forward"),
    ):
        original = getattr(trainer, name)

        @functools.wraps(original)
        def timed(*a: Any, _f: Any = original, _p: str = phase, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                phases[_p] += time.perf_counter() - t

        setattr(trainer, name, timed)
    load_s = time.perf_counter() - t0
    trainer.train()

    rows = s.prompts * s.n
    train_logs = [lg for lg in records if "completions/mean_length" in lg]
    steps = []
    for i in range(total):
        wall = ends[i + 1] - ends[i]
        ph = per_step[i]
        step = {"wall_s": wall, "cpu_s": cpu_ends[i + 1] - cpu_ends[i]}
        step.update({f"time/{k}": v for k, v in ph.items()})
        step["time/rest"] = wall - sum(ph.values())
        if i < len(train_logs):
            step["tokens"] = train_logs[i]["completions/mean_length"] * rows
            step["success_rate"] = train_logs[i]["self_distillation/reward_mean"]
            step["context_fraction"] = train_logs[i]["self_distillation/reprompt_sample_fraction"]
        steps.append(step)
    emit(
        {
            "load_s": load_s,
            "steps": steps[s.warmup :],
            "peak_rss_mb": peak_rss_mb(),
            "logs": records,
        }
    )


if __name__ == "__main__":
    main()
