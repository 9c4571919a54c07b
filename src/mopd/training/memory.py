"""Handing memory that was freed back to the operating system after each training step.

glibc's allocator keeps freed blocks inside its heaps for reuse. A training step frees
gigabytes of differently sized activations, logits and merged weights; the holes they
leave stay resident, and the next step's allocations do not fit back into them exactly,
so the resident size climbs from step to step. With the packaged 1.5B student (bfloat16,
LoRA, 2S1F teacher, HumanEval, 128-token answers) the second step of a run reached 24 GiB
of anonymous memory and was killed on a 24 GiB machine; ``malloc_trim(0)`` at the end of
each step brings a step's 13.7 GiB back to the 8.9 GiB the models and the EMA record hold
(docs/benchmarks.md). Elsewhere (macOS, musl, Windows) it is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's free heap pages to the system; whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
