"""Process-wide settings for CPU speed, applied by the entry points (the CLI, `train`, the pipeline `MMFusion`,
the benchmarks).

glibc's malloc hands every block above its mmap threshold (128 KiB to start with) straight back to the
kernel when it is freed, and trims the top of the heap at 128 KiB free. A training step allocates and
frees the same few-MB activations each time, so each step page-faults them in again and the kernel
zeroes them, thousands of page faults a step on a small model. Raising both thresholds keeps those pages
in the process: fewer faults and shorter steps at the same peak memory (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's --help should not wait for it
    import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # blocks up to 32 MiB come from the heap (glibc's largest allowed value)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap instead of returning it at once
_tuned: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (Linux with glibc only). Left alone when
    the user already chose: any MALLOC_*_ variable set, or another allocator preloaded (LD_PRELOAD,
    e.g. jemalloc or tcmalloc). Returns whether the thresholds were set. Safe to call more than once."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    chosen = os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ)
    if sys.platform != "linux" or chosen:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, say)
        return False
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """Dense matmul throughput of this machine for `dtype` (GFLOP/s), measured now."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


@functools.cache
def bf16_native() -> tuple[bool, float, float]:
    """Whether this CPU multiplies bf16 natively: a 512^3 bf16 matmul at no less than a fifth of the fp32
    rate (where it is emulated it runs far slower, and timing 2048^3 products would take minutes).
    Returns (native, bf16 GFLOP/s, fp32 GFLOP/s) at 512^3; measured once per process."""
    import torch

    fp32, bf16 = matmul_gflops(torch.float32, 512, 0.3), matmul_gflops(torch.bfloat16, 512, 0.3)
    return bf16 >= 0.2 * fp32, bf16, fp32
