"""Seeds derived from the run seed: every random draw of a run starts here.

A run never reads global RNG state; each draw (a step's sampling, a shard, a peer pick,
the LoRA initialisation, a vLLM request) gets its own seed from the run seed and names
that say what it is for. The same names give the same seed in every process and on every
Python version, which is what makes resumed and multi-process runs replay exactly.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from `parts`, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
