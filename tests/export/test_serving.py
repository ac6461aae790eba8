"""Serving check: batching over a real ONNX Runtime session, and the open-loop load generator.

The models are tiny ONNX graphs built with ``onnx.helper`` whose outputs identify their input
(identity, plus a row sum as a second output), so a result that went to the wrong caller, or
a batch split in the wrong order, shows.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from distill.errors import UserError
from distill.export.serving import (
    BatchingServer,
    batch_ready,
    describe_model,
    open_session,
    poisson_schedule,
    run_load,
    serving_report,
    warmup,
)

FEAT = 4


def make_identity_onnx(path, batch: int | str = "batch", sample: tuple[int, ...] = (FEAT,),
                       scalar_output: bool = False) -> str:
    """``y = x`` and ``s = sum(x, axis=1)`` (a size-1 axis kept) for ``x`` of (batch, *sample)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *sample])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, *sample])
    s_shape = [] if scalar_output else [batch, 1, *sample[1:]]
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, s_shape)
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    if scalar_output:  # no batch axis: cannot be split per request
        nodes.append(helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1))
    graph = helper.make_graph(nodes, "ident", [x], [y, s], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def ident(tmp_path_factory) -> str:
    return make_identity_onnx(tmp_path_factory.mktemp("serve") / "ident.onnx")


@pytest.fixture(scope="module")
def session(ident):
    return open_session(ident, threads=1)


@pytest.mark.parametrize("strategy", ["none", "static", "dynamic"])
def test_every_caller_gets_its_own_result_under_concurrency(session, strategy):
    n_threads, per_thread, max_batch = 8, 50, 8
    server = BatchingServer(session, strategy, max_batch=max_batch, max_wait_ms=20)
    errors: list[str] = []

    def client(tid: int) -> None:
        futures = []
        for i in range(per_thread):
            sample = np.array([tid, i, tid * 1000 + i, -1.0], np.float32)
            futures.append((sample, server.submit(sample)))
        for sample, fut in futures:
            y, s = fut.result(timeout=10)
            if not (np.array_equal(y, sample) and np.isclose(s[0], sample.sum())):
                errors.append(f"thread {tid}: sent {sample}, got {y} / {s}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    server.close()
    assert errors == []
    sizes = server.batch_sizes
    assert sum(sizes) == n_threads * per_thread
    assert max(sizes) <= max_batch
    if strategy == "none":
        assert set(sizes) == {1}
    elif strategy == "static":  # 400 requests, all batches full
        assert set(sizes) == {max_batch}
    else:  # 8 threads flooding with a 20 ms window: requests do share batches
        assert max(sizes) > 1


@pytest.mark.parametrize(
    "strategy, waiting, age_s, closing, expected",
    [
        ("none", 0, 0.0, False, False),
        ("none", 1, 0.0, False, True),
        ("static", 3, 10.0, False, False),  # static never times out
        ("static", 4, 0.0, False, True),
        ("static", 3, 0.0, True, True),  # ...but flushes at close
        ("dynamic", 3, 0.001, False, False),
        ("dynamic", 3, 0.002, False, True),  # the oldest waited max_wait
        ("dynamic", 4, 0.0, False, True),  # full batch
        ("dynamic", 0, 1.0, True, False),
    ],
)
def test_batch_ready_policy(strategy, waiting, age_s, closing, expected):
    assert batch_ready(strategy, waiting, age_s, max_batch=4, max_wait_s=0.002,
                       closing=closing) is expected


def test_static_runs_a_partial_batch_only_at_close(session):
    server = BatchingServer(session, "static", max_batch=4)
    futures = [server.submit(np.full(FEAT, i, np.float32)) for i in range(3)]
    time.sleep(0.1)
    assert not any(f.done() for f in futures)
    assert server.close() == 0
    assert [f.result()[0][0] for f in futures] == [0, 1, 2]
    assert server.batch_sizes == [3]


def test_dynamic_runs_a_partial_batch_after_max_wait(session):
    server = BatchingServer(session, "dynamic", max_batch=64, max_wait_ms=5)
    futures = [server.submit(np.full(FEAT, i, np.float32)) for i in range(3)]
    # no close: the 5 ms window alone must release them
    assert [f.result(timeout=5)[0][0] for f in futures] == [0, 1, 2]
    assert sum(server.batch_sizes) == 3
    server.close()


def test_close_with_zero_timeout_cancels_what_waits(session):
    server = BatchingServer(session, "static", max_batch=10)
    futures = [server.submit(np.zeros(FEAT, np.float32)) for _ in range(3)]
    assert server.close(timeout=0) == 3
    assert all(f.cancelled() for f in futures)
    assert server.batch_sizes == []
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(np.zeros(FEAT, np.float32))


def test_submit_rejects_a_wrong_sample_shape(session):
    with BatchingServer(session, "dynamic") as server:
        with pytest.raises(ValueError, match=r"sample shape \(1, 4\) != .*\(4,\)"):
            server.submit(np.zeros((1, FEAT), np.float32))


def test_server_rejects_bad_arguments(session):
    with pytest.raises(UserError, match="strategy must be one of none, static, dynamic; got 'x'"):
        BatchingServer(session, "x")
    with pytest.raises(UserError, match="max_batch must be >= 1; got 0"):
        BatchingServer(session, "dynamic", max_batch=0)
    with pytest.raises(UserError, match="max_wait_ms must be >= 0; got -1"):
        BatchingServer(session, "dynamic", max_wait_ms=-1)


def test_poisson_schedule_is_exact_in_count_and_exponential_in_gaps():
    arrivals = poisson_schedule(qps=1000, duration_s=20, seed=3)
    assert len(arrivals) == 20_000
    assert np.all(np.diff(arrivals) >= 0) and 0 <= arrivals[0] and arrivals[-1] < 20.0
    gaps = np.diff(arrivals)
    assert gaps.mean() == pytest.approx(1e-3, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV = 1
    assert len(poisson_schedule(1000, 20, max_requests=50)) == 50


def test_load_generator_hits_the_target_rate_when_the_server_keeps_up(session):
    server = BatchingServer(session, "dynamic", max_batch=8, max_wait_ms=1)
    r = run_load(server, np.random.default_rng(0).standard_normal((32, FEAT)), qps=200,
                 duration_s=2.0, slo_p99_ms=1000)
    assert r["submitted"] == r["completed"] == 400
    assert r["dropped"] == r["failed"] == r["late"] == 0
    assert r["achieved_qps"] == pytest.approx(200, rel=0.05)
    assert r["wall_s"] >= 1.5  # submitted over the schedule, not all at once
    assert sum(k * v for k, v in r["batch_hist"].items()) == 400
    assert max(r["batch_hist"]) <= 8
    assert r["slo_met"] is True
    assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]


def test_load_generator_is_open_loop(session):
    # static batching with room for everything: nothing completes until the end, yet every
    # request is submitted on schedule, so the first one waited for the whole schedule
    server = BatchingServer(session, "static", max_batch=1000)
    r = run_load(server, np.zeros((1, FEAT), np.float32), qps=100, duration_s=0.5,
                 slo_p99_ms=100)
    assert r["batch_hist"] == {50: 1}
    assert r["completed"] == 50
    assert r["max_ms"] >= 300
    assert r["late"] > 0 and r["slo_met"] is False


def test_requests_the_drain_cannot_serve_are_dropped(session):
    server = BatchingServer(session, "static", max_batch=1000)
    r = run_load(server, np.zeros((1, FEAT), np.float32), qps=200, duration_s=0.1,
                 slo_p99_ms=100, drain_s=0)
    assert r["submitted"] == r["dropped"] == 20
    assert r["completed"] == 0 and r["p99_ms"] is None and r["slo_met"] is False


def test_fixed_batch_model_is_served_unbatched(tmp_path):
    path = make_identity_onnx(tmp_path / "fixed.onnx", batch=1)
    session = open_session(path)
    assert describe_model(session).fixed_batch == 1
    with pytest.raises(UserError, match=r"fixed batch axis \(1\).*strategy 'dynamic'"):
        BatchingServer(session, "dynamic")
    with BatchingServer(session, "none") as server:
        assert server.submit(np.arange(FEAT, dtype=np.float32)).result()[0].tolist() == [0, 1,
                                                                                         2, 3]
    report = serving_report(path, qps=100, duration_s=0.2, slo_p99_ms=100, max_batch=8,
                            max_wait_ms=2)
    assert report["batch_axis"] == "fixed at 1"
    assert "served without batching" in report["note"]
    assert report["strategies"]["none"]["completed"] == 20
    for name in ("static", "dynamic"):
        assert "skipped" in report["strategies"][name]


def test_fixed_batch_above_one_pads_each_request(tmp_path):
    session = open_session(make_identity_onnx(tmp_path / "fixed2.onnx", batch=2))
    with BatchingServer(session, "none") as server:
        futures = [server.submit(np.full(FEAT, i, np.float32)) for i in range(5)]
        assert [f.result()[1][0] for f in futures] == [0, 4, 8, 12, 16]


def test_serving_report_measures_three_strategies_on_one_schedule(ident):
    report = serving_report(ident, qps=300, duration_s=0.3, slo_p99_ms=500, max_batch=4,
                            max_wait_ms=1)
    assert report["batch_axis"] == "dynamic" and report["note"] is None
    runs = report["strategies"]
    assert list(runs) == ["none", "static", "dynamic"]
    assert {r["submitted"] for r in runs.values()} == {90}
    assert runs["none"]["batch_hist"] == {1: 90}
    assert all(size <= 4 for r in runs.values() for size in r["batch_hist"])


def test_serving_report_interleaves_rounds_and_merges_them(ident):
    report = serving_report(ident, qps=300, duration_s=0.4, slo_p99_ms=500, max_batch=4,
                            max_wait_ms=1, strategies=("none", "dynamic"), rounds=2)
    assert report["rounds"] == 2 and list(report["strategies"]) == ["none", "dynamic"]
    for r in report["strategies"].values():
        assert r["rounds"] == 2
        assert r["submitted"] == r["completed"] == 2 * 60  # two rounds of 0.2 s at 300 qps
        assert sum(k * v for k, v in r["batch_hist"].items()) == 120
    assert report["strategies"]["dynamic"]["max_wait_ms"] == 1.0
    assert report["strategies"]["none"]["max_batch"] == 1


def test_serving_report_rejects_bad_arguments(ident):
    with pytest.raises(UserError, match="qps must be > 0; got 0"):
        serving_report(ident, qps=0, duration_s=1, slo_p99_ms=10, max_batch=4, max_wait_ms=1)
    with pytest.raises(UserError, match="max_batch must be >= 1; got 0"):
        serving_report(ident, qps=10, duration_s=1, slo_p99_ms=10, max_batch=0, max_wait_ms=1)
    with pytest.raises(UserError, match="rounds must be >= 1; got 0"):
        serving_report(ident, qps=10, duration_s=1, slo_p99_ms=10, max_batch=4, max_wait_ms=1,
                       rounds=0)
    with pytest.raises(UserError, match=r"strategies must be among none, static, dynamic"):
        serving_report(ident, qps=10, duration_s=1, slo_p99_ms=10, max_batch=4, max_wait_ms=1,
                       strategies=("fast",))


def test_open_session_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="ONNX file not found: .*nope.onnx"):
        open_session(tmp_path / "nope.onnx")
    (tmp_path / "model.txt").write_text("hello")
    with pytest.raises(UserError, match="model.txt: not a loadable ONNX model"):
        open_session(tmp_path / "model.txt")
    with pytest.raises(UserError, match="'threads' must be >= 1; got 0"):
        open_session(tmp_path / "model.txt", threads=0)


def test_warmup_rejects_an_output_without_batch_axis(tmp_path):
    session = open_session(make_identity_onnx(tmp_path / "scalar.onnx", scalar_output=True))
    with pytest.raises(UserError, match="output 's' has shape .* no batch axis"):
        warmup(session, max_batch=2)
