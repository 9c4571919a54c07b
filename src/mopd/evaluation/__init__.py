"""Evaluation of trained students and of the teacher signal.

`mopd.evaluation.metrics` holds the numbers themselves: mean@k and pass@k, the per-prompt
ranking metrics of the teacher-signal analysis, and a prompt-level bootstrap interval.
"""
