"""Freed heap memory goes back to the system after a step (glibc)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from mopd.training.memory import _malloc_trim, release_freed_memory

pytestmark = pytest.mark.unit


def _anon_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim (Linux)")
def test_holes_left_in_the_heap_are_returned():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 2048  # 128 MiB in blocks below the mmap threshold: heap memory
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)  # make the pages resident
    for block in blocks[::2]:  # every other block: holes the heap cannot shrink past
        libc.free(block)
    before = _anon_kib()
    assert release_freed_memory()
    returned_mib = (before - _anon_kib()) / 1024
    for block in blocks[1::2]:
        libc.free(block)
    assert returned_mib > 32, returned_mib  # about 64 MiB of holes


def test_elsewhere_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    _malloc_trim.cache_clear()
    try:
        assert release_freed_memory() is False
    finally:
        _malloc_trim.cache_clear()
