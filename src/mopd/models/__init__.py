"""Models: loading by name (Hub id, local folder, packaged offline model), exact batched
response scoring, and the teachers that provide distillation targets."""

from __future__ import annotations

from mopd.models.loading import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from mopd.models.scoring import (
    ScoringBatch,
    build_scoring_batch,
    response_logits,
)
from mopd.models.teachers import (
    TEACHER_KINDS,
    EmaTeacher,
    ExternalTeacher,
    Teacher,
    TrustRegionTeacher,
    build_teacher,
    check_same_vocabulary,
)

__all__ = [
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "TEACHER_KINDS",
    "EmaTeacher",
    "ExternalTeacher",
    "ScoringBatch",
    "Teacher",
    "TrustRegionTeacher",
    "build_scoring_batch",
    "build_teacher",
    "check_same_vocabulary",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
    "response_logits",
]
