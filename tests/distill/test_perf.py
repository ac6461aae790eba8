"""The allocator setting that distill train applies: really in effect, and opt-out works."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
from distill.perf import tune_allocator, allocator_tuned
tuned = tune_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
ptrs = [libc.malloc(8 << 20) for _ in range(8)]  # 8 x 8 MiB: above glibc's mmap threshold
heap = [line.split()[0].split("-") for line in open("/proc/self/maps") if "[heap]" in line]
lo, hi = (int(heap[0][0], 16), int(heap[0][1], 16)) if heap else (0, 0)
in_heap = sum(lo <= p < hi for p in ptrs)
for p in ptrs:
    libc.free(p)
print(json.dumps({"tuned": tuned, "again": tune_allocator(), "flag": allocator_tuned(),
                  "in_heap": in_heap}))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_tuned_allocator_serves_large_buffers_from_the_heap():
    tuned = _probe({"DISTILL_MALLOC": "tuned"})
    assert tuned["tuned"] and tuned["again"] and tuned["flag"]
    # with mmap off, eight 8 MiB buffers come from the heap, where freed memory is reused
    assert tuned["in_heap"] == 8
    system = _probe({"DISTILL_MALLOC": "system"})
    assert not system["tuned"] and not system["flag"]
    assert system["in_heap"] == 0  # glibc's default: a fresh mmap per large buffer
