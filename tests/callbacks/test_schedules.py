"""Sparsity schedules: endpoints, monotonicity, the Zhu & Gupta cubic formula, bad input."""

from __future__ import annotations

import pickle

import pytest

from distill.callbacks.schedules import SCHEDULES, make_schedule
from distill.errors import UserError


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_endpoints_and_hold(name):
    f = make_schedule(name, initial=0.1, final=0.6, start=2, end=6)
    assert f(0) == 0.0 and f(1.99) == 0.0  # dense before start
    expected_start = 0.6 if name == "constant" else 0.1
    assert f(2) == pytest.approx(expected_start)
    assert f(6) == pytest.approx(0.6)
    assert f(7) == pytest.approx(0.6) and f(100) == pytest.approx(0.6)  # fine-tune: constant


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_monotone_non_decreasing(name):
    f = make_schedule(name, initial=0.0, final=0.9, start=0, end=10)
    values = [f(t / 4) for t in range(-4, 60)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert all(0.0 <= v < 1.0 for v in values)


def test_cubic_matches_zhu_gupta_formula():
    s_i, s_f, t0, n, dt = 0.05, 0.8, 3, 5, 2  # end = t0 + n * dt
    f = make_schedule("cubic", s_i, s_f, t0, t0 + n * dt)
    for t in range(t0, t0 + n * dt + 1):
        assert f(t) == pytest.approx(s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3)
    # front-loaded: more than half the ramp is done a third of the way in
    assert f(t0 + n * dt / 3) > (s_i + s_f) / 2


def test_linear_and_exponential_shapes():
    lin = make_schedule("linear", 0.0, 0.5, 0, 4)
    assert [lin(t) for t in range(5)] == pytest.approx([0, 0.125, 0.25, 0.375, 0.5])
    exp = make_schedule("exponential", 0.0, 0.75, 0, 2)
    # the density halves every step: 1 -> 0.5 -> 0.25
    assert [1 - exp(t) for t in range(3)] == pytest.approx([1.0, 0.5, 0.25])


def test_one_shot_when_end_equals_start():
    f = make_schedule("cubic", 0.0, 0.5, 3, 3)
    assert (f(2), f(3), f(4)) == (0.0, 0.5, 0.5)


def test_callable_schedule_accepted_and_checked():
    f = make_schedule(lambda epoch: min(0.1 * epoch, 0.5))
    assert f(3) == pytest.approx(0.3) and f(9) == pytest.approx(0.5)
    bad = make_schedule(lambda epoch: 1.0 if epoch > 1 else 0.0)
    assert bad(1) == 0.0
    with pytest.raises(UserError, match=r"'schedule\(2\)' must be in \[0, 1\); got 1.0"):
        bad(2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "cubik"}, r"unknown pruning schedule 'cubik' \(did you mean 'cubic'\?\); "
                            r"known: constant, linear, cubic, exponential"),
        ({"name": "zzz"}, r"unknown pruning schedule 'zzz'; known: constant, linear"),
        ({"final": 1.0}, r"'target_sparsity' must be in \[0, 1\); got 1.0"),
        ({"initial": -0.1}, r"'initial_sparsity' must be in \[0, 1\); got -0.1"),
        ({"final": "half"}, r"'target_sparsity' must be a number in \[0, 1\); got 'half'"),
        ({"start": 5, "end": 2}, r"pruning 'end' \(2\) is before 'start' \(5\)"),
        ({"initial": 0.6, "final": 0.3}, r"below 'initial_sparsity' \(0.6\)"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, message):
    args = {"name": "cubic", "initial": 0.0, "final": 0.5, "start": 0, "end": 3, **kwargs}
    with pytest.raises(UserError, match=message):
        make_schedule(**args)


def test_schedules_pickle_for_ddp_spawn():
    f = make_schedule("cubic", 0.0, 0.5, 1, 4)
    g = pickle.loads(pickle.dumps(f))
    assert [g(t) for t in range(6)] == [f(t) for t in range(6)]
    assert pickle.loads(pickle.dumps(make_schedule(min)))  # a picklable user callable
