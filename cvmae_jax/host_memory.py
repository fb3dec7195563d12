"""Keep freed host memory for reuse, so the CPU backend does not page-fault on every step.

XLA on CPU allocates each step's temporaries (for the default config, several [B, H, L, L]
float32 attention tensors of 33 MB) with malloc. glibc serves blocks above its mmap threshold
(at most 32 MB) and blocks requested from worker-thread arenas with fresh ``mmap`` calls and
gives them back with ``munmap``, so every step touches hundreds of MB of new pages that the
kernel must fault in and zero. Measured on a 2-core CPU (benchmarks/NOTES.md): writing one
33 MB array took 14 ms with fresh pages and 2.3 ms with reused ones.

With one JAX device trimming is off entirely, not just above a large threshold: with a 2 GB
threshold (the largest positive value ``mallopt`` takes) the ``large`` benchmark step, whose
freed temporaries exceed 2 GB, had its heap top returned and faulted in again every step (730k
page faults, 7.8 s per step against 4.7-5.0 s without; benchmarks/NOTES.md).
Several CPU devices (``config.parallel.cpu_devices``) allocate concurrently, in a different
order each step, which fragments the one arena: without trimming the ``large`` step's heap grew
by 1.24 GB every few steps (5.6 -> 14.3 GB in 43 steps), so ``parallel.set_cpu_devices`` caps the
kept free top at 2 GB again (``cap_heap_for_concurrent_devices``).

``reuse_freed_memory()`` sets glibc's malloc to one arena, no mmap'd blocks and no trimming, so
freed blocks are reused. The price: the process keeps its peak heap until it exits (normal for
a training job). It does nothing on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NO_TRIMMING = -1  # M_TRIM_THRESHOLD -1: never return the heap's top to the system (mallopt(3))
CONCURRENT_DEVICES_TRIM_ABOVE = 2**31 - 1  # bytes of free heap top kept with several devices
_reusing = False  # reuse_freed_memory applied in this process


@functools.cache
def _mallopt():
    """glibc's ``mallopt``, or None on other C libraries (macOS, musl without it)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


@functools.cache
def reuse_freed_memory() -> bool:
    """Configures glibc malloc once per process; returns True if it applied. Call it before
    JAX creates its thread pools (before the first jax.devices() / jit) for full effect."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NO_TRIMMING))
    global _reusing
    _reusing = all(mallopt(param, value) == 1 for param, value in settings)
    return _reusing


def cap_heap_for_concurrent_devices() -> None:
    """With several JAX devices in this process: return free heap top above 2 GB to the system
    again, which bounds what fragmentation from their concurrent allocations keeps. Does
    nothing unless ``reuse_freed_memory`` applied."""
    if _reusing:
        _mallopt()(M_TRIM_THRESHOLD, CONCURRENT_DEVICES_TRIM_ABOVE)
