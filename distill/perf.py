"""Process-level settings that make CPU training faster.

``tune_allocator`` stops glibc's ``malloc`` from handing every large tensor buffer back to the
kernel when it is freed. By default glibc serves big allocations with fresh ``mmap`` calls and
``munmap``s them on free, so each training step page-faults (and zeroes) its activations again.
Serving them from the heap and keeping freed memory for reuse made a KD epoch of the default
student ~10 % faster on a 2-core VM (``scripts/benchmark.py`` section a applies it to both
loops it compares, as ``distill train`` does). The cost: the process keeps the memory of its
largest step instead of returning it to the system between steps.

It is applied once, at the start of ``distill train``; ``DISTILL_MALLOC=system`` leaves the
allocator as it is, and so does any platform without glibc (with a preloaded jemalloc or
tcmalloc the settings are harmless: glibc's heap then serves almost nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_state: dict[str, bool] = {}


def tune_allocator() -> bool:
    """Serve tensor buffers from the heap and keep freed memory (glibc only); idempotent.

    Returns:
        Whether the settings are in effect in this process.
    """
    if "tuned" in _state:
        return _state["tuned"]
    tuned = False
    if (os.environ.get("DISTILL_MALLOC", "tuned") != "system"
            and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)  # no mmap per allocation
                         and libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)  # keep freed memory
                         and libc.mallopt(_M_TOP_PAD, 64 << 20))  # grow the heap in 64 MiB
        except (OSError, AttributeError):
            tuned = False
    _state["tuned"] = tuned
    return tuned


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` has taken effect in this process."""
    return _state.get("tuned", False)
