"""Offline KD: the teacher's logits computed once per training sample, then reused.

The teacher is frozen, so with a deterministic data pipeline (no random augmentation) its
output for a sample never changes: running it every epoch is wasted work, often most of the
step when the teacher is much larger than the student. Samples are keyed by a hash of their
bytes, so the cache works with any data loader and shuffling; a sample that changes between
epochs (random augmentation) is detected and refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from distill.errors import UserError


def _keys(x: torch.Tensor) -> list[bytes]:
    flat = x.detach().to("cpu", torch.float32).contiguous().view(x.shape[0], -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


class TeacherCache:
    """A per-sample store of teacher logits.

    Example:
        >>> cache = TeacherCache()
        >>> logits = cache.logits(x, teacher)  # runs the teacher only for unseen samples
    """

    def __init__(self) -> None:
        self._store: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.frozen = False  # set after the first full epoch: a miss then means augmentation

    def __len__(self) -> int:
        return len(self._store)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
        keys = _keys(x)
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        if missing and self.frozen:
            raise UserError(
                "distill.cache_teacher: a training sample changed between epochs (random "
                "augmentation?); caching needs a deterministic data pipeline — set "
                "distill.cache_teacher=false"
            )
        if missing:
            out = teacher(x[missing]).detach().cpu()
            for j, i in enumerate(missing):
                self._store[keys[i]] = out[j]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack([self._store[k] for k in keys]).to(x.device)


def check_deterministic(dataset: Any, probes: int = 4) -> None:
    """Fetch a few samples twice; a difference means random augmentation (refused)."""
    n = min(probes, len(dataset))
    for i in range(n):
        a, b = dataset[i], dataset[i]
        xa = a[0] if isinstance(a, (tuple, list)) else a
        xb = b[0] if isinstance(b, (tuple, list)) else b
        if not torch.equal(torch.as_tensor(xa), torch.as_tensor(xb)):
            raise UserError(
                "distill.cache_teacher=true needs a training set without random augmentation "
                f"(sample {i} differed between two reads)"
            )
