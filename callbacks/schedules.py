"""Sparsity schedules for iterative pruning: ``step -> sparsity``.

A schedule ramps the sparsity from ``initial`` at step ``start`` to ``final`` at step ``end`` and
then holds it (the remaining epochs fine-tune the pruned network). Before ``start`` the network
is dense (sparsity 0). A step is an epoch, or a fractional epoch when pruning at batch
granularity; the shape of the ramp is one of:

- ``constant``: one shot, ``final`` from ``start`` on.
- ``linear``: ``s_t = s_i + (s_f - s_i) * p`` with progress ``p = (t - t0) / (t1 - t0)``.
- ``cubic``: Zhu & Gupta 2017, "To prune, or not to prune" (arXiv:1710.01878):
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3``; prunes fast while the network is
  redundant, slowly near the target.
- ``exponential``: the density ``1 - s`` decays geometrically,
  ``s_t = 1 - (1 - s_i) * ((1 - s_f) / (1 - s_i))**p``: every step removes the same share of
  what is left (NNCF's exponential pruning schedule).

Any callable ``step -> sparsity`` is accepted too (a recipe written in Python); its values are
checked when called.

Example:
    >>> f = make_schedule("cubic", initial=0.0, final=0.5, start=0, end=4)
    >>> [round(f(t), 4) for t in range(6)]
    [0.0, 0.2891, 0.4375, 0.4922, 0.5, 0.5]
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from distill.errors import UserError

Schedule = Callable[[float], float]

#: When a pruning callback steps its schedule: at every epoch start, or at every batch start
#: on fractional epochs.
GRANULARITIES = ("epoch", "batch")


def _progress(t: float, start: float, end: float) -> float:
    """Share of the ramp done at step ``t``, clamped to [0, 1]; a zero-length ramp is a step."""
    if end <= start:
        return 1.0 if t >= start else 0.0
    return min(max((t - start) / (end - start), 0.0), 1.0)


def constant(t: float, initial: float, final: float, start: float, end: float) -> float:
    """One-shot pruning: ``final`` from ``start`` on (``initial`` and ``end`` are unused)."""
    return final


def linear(t: float, initial: float, final: float, start: float, end: float) -> float:
    """``s_t = s_i + (s_f - s_i) * p``."""
    return initial + (final - initial) * _progress(t, start, end)


def cubic(t: float, initial: float, final: float, start: float, end: float) -> float:
    """Zhu & Gupta 2017: ``s_t = s_f + (s_i - s_f) * (1 - p)**3``."""
    return final + (initial - final) * (1.0 - _progress(t, start, end)) ** 3


def exponential(t: float, initial: float, final: float, start: float, end: float) -> float:
    """Geometric decay of the density: ``s_t = 1 - (1 - s_i) * ((1 - s_f) / (1 - s_i))**p``."""
    ratio = (1.0 - final) / (1.0 - initial)
    return 1.0 - (1.0 - initial) * ratio ** _progress(t, start, end)


SCHEDULES: dict[str, Callable[[float, float, float, float, float], float]] = {
    "constant": constant,
    "linear": linear,
    "cubic": cubic,
    "exponential": exponential,
}


def check_sparsity(name: str, value: float) -> float:
    """``value`` as a float in [0, 1), or ``UserError`` naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"'{name}' must be a number in [0, 1); got {value!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise UserError(f"'{name}' must be in [0, 1); got {value}")
    return value


def check_granularity(granularity: str) -> str:
    """``granularity`` if it is one of :data:`GRANULARITIES`, else ``UserError``."""
    if granularity not in GRANULARITIES:
        raise UserError(f"'granularity' must be one of {', '.join(GRANULARITIES)}; "
                        f"got '{granularity}'")
    return granularity


def check_layer_list(ignore_layers: Sequence[str]) -> list[str]:
    """``ignore_layers`` as a list; a bare string (one name, not a list) is a ``UserError``."""
    if isinstance(ignore_layers, str):
        raise UserError(f"'ignore_layers' must be a list of layer names; got '{ignore_layers}'")
    return list(ignore_layers)


def batch_step(trainer: Any, batch_idx: int) -> float:
    """The schedule's step at a batch: the epoch plus the share of it already done."""
    n = trainer.num_training_batches
    return trainer.current_epoch + (batch_idx / n if n and n != float("inf") else 0.0)


@dataclass(frozen=True)
class RampSchedule:
    """A named ramp from ``initial`` at ``start`` to ``final`` at ``end`` (picklable: DDP spawn
    and checkpoint tools copy callbacks)."""

    name: str
    initial: float
    final: float
    start: float
    end: float

    def __call__(self, t: float) -> float:
        if t < self.start:
            return 0.0
        return SCHEDULES[self.name](t, self.initial, self.final, self.start, self.end)


@dataclass(frozen=True)
class CheckedSchedule:
    """A user callable whose values are checked: outside [0, 1) fails with the step."""

    fn: Callable[[float], float]

    def __call__(self, t: float) -> float:
        return check_sparsity(f"schedule({t})", self.fn(t))


def make_schedule(
    name: str | Callable[[float], float],
    initial: float = 0.0,
    final: float = 0.5,
    start: float = 0,
    end: float = 0,
) -> Schedule:
    """Build ``step -> sparsity``.

    Args:
        name: ``constant``, ``linear``, ``cubic``, ``exponential``, or a callable of the step
            (epoch) returning the sparsity; a callable ignores the other arguments.
        initial: Sparsity at ``start`` (``s_i``), in [0, 1).
        final: Sparsity at ``end`` and after (``s_f``), in [0, 1).
        start: First pruning step (``t0``).
        end: Step at which ``final`` is reached (``t0 + n * dt``); ``end == start`` is one shot.

    Returns:
        A function of the step: 0 before ``start``, the ramp between, ``final`` after ``end``.

    Raises:
        UserError: unknown schedule name (lists the known ones), sparsity outside [0, 1),
            ``end`` before ``start``, or ``final`` below ``initial``.
    """
    if callable(name):
        return CheckedSchedule(name)
    if not isinstance(name, str) or name not in SCHEDULES:
        close = difflib.get_close_matches(str(name), SCHEDULES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"unknown pruning schedule '{name}'{hint}; known: {', '.join(SCHEDULES)}"
        )
    initial = check_sparsity("initial_sparsity", initial)
    final = check_sparsity("target_sparsity", final)
    if final < initial:
        raise UserError(
            f"'target_sparsity' ({final}) is below 'initial_sparsity' ({initial}): "
            "pruning only removes, it never regrows"
        )
    if end < start:
        raise UserError(f"pruning 'end' ({end}) is before 'start' ({start})")
    return RampSchedule(name, initial, final, start, end)
