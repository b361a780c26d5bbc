"""Keeping the process's resident memory close to what is live (glibc malloc and MKL tuning).

glibc keeps freed memory in its heap and raises its mmap threshold as large blocks are freed, so a
process that allocates and frees large tensors in a loop (importance scoring, supernet candidates)
holds far more RSS than it uses. Both functions are no-ops where the C library lacks them.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os

M_MMAP_THRESHOLD = -3  # glibc malloc.h


@functools.cache
def _libc_function(name: str):
    """A C library function of this process (looked up once), or None where it has none of that name."""
    return getattr(ctypes.CDLL(None), name, None)


def return_freed_heap(collect: bool = True) -> None:
    """Hand memory freed so far back to the OS (``collect``: run Python's garbage collector first).

    Measured: ~330 MiB after sorting SmolLM2, ~260 MiB after tokenizing the calibration text, and the
    heap left over by each supernet candidate.
    """
    if collect:
        gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def free_large_blocks_eagerly(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes and more by mmap, so freeing them returns them to the OS.

    Measured on SmolLM2: a supernet sweep peaks ~130–190 MiB lower.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, threshold)


def keep_mkl_from_caching_buffers() -> None:
    """Ask MKL not to keep freed GEMM buffers per thread (``MKL_DISABLE_FAST_MM``; a user's own value wins).

    MKL reads it when torch loads, so it only takes effect if set before ``import torch``.
    Measured on SmolLM2: ~26 MiB less resident after importance sorting, same evaluation speed.
    """
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
