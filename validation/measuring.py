"""Wall time and peak memory of one call, for the ``cost`` suite and its frontier.

Time is wall clock (best of ``repeat`` runs). Peak memory is the largest resident-set
growth during the call, sampled every millisecond by a background thread, after
returning freed heap memory to the system (on CUDA: ``torch.cuda.max_memory_allocated``);
values below about 1 MiB are noise.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["measure"]


def _release_freed_memory() -> None:
    """Return freed heap memory to the system (glibc), so that resident-set growth
    measures new allocations rather than reuse of memory freed earlier. Also fixes
    glibc's mmap threshold at 128 KiB (it otherwise grows up to 32 MiB after large
    frees, and such buffers then stay resident). A no-op on other C libraries."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> tuple[float, int, Any]:
    """``(seconds, peak bytes, result)`` of ``fn()``; seconds is the best of ``repeat``."""
    gc.collect()
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = None
    if device.type != "cuda":
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    best = math.inf
    result = None
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device) - base
    else:
        used = max(peak[0], _rss()) - base
    return best, int(used), result
