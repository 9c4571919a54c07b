"""Evaluation of trained students and of the teacher signal.

`mopd.evaluation.evaluate` samples and scores a model on a task's held-out prompts,
`mopd.evaluation.analysis` scores the same rollouts under several teacher contexts, and
`mopd.evaluation.metrics` holds the numbers themselves: mean@k and pass@k, the
per-prompt ranking metrics of the teacher-signal analysis, and a prompt-level bootstrap
interval.
"""
