"""Giving freed memory back, so the next phase of a round does not inherit the last one's peak."""

from __future__ import annotations

import ctypes
import gc
import sys

import torch


def release_memory() -> None:
    """Return freed tensors' memory now: to the allocator's cache on CUDA, to the OS on CPU (glibc
    keeps freed heap pages, e.g. of Adam moments under its mmap threshold, until trimmed)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).malloc_trim(0)
