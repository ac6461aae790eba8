"""Latency measurement in real ONNX Runtime sessions, on small hand-built ONNX graphs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from distill.errors import UserError
from distill.export.latency import (
    load_session,
    make_feed,
    measure_latency,
    measure_torch_latency,
    summarize,
)


def write_mlp(path: Path, batch: int | str = "batch", features: int | str = 32) -> Path:
    """input[batch, features] -> MatMul -> Add -> Relu -> MatMul -> logits[batch, 10]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    return write_mlp(tmp_path_factory.mktemp("lat") / "mlp.onnx")


STAT_KEYS = {"batch_size", "iters", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms",
             "min_ms", "max_ms", "cv", "throughput_qps", "provider", "execution_provider",
             "threads", "inter_threads", "warmup", "peak_mem_mb", "mem_source", "onnxruntime"}


def test_measure_latency_reports_ordered_statistics_per_batch(mlp):
    res = measure_latency(mlp, batch_sizes=(1, 4), threads=1, warmup=3, iters=30)
    assert list(res) == [1, 4]
    for b, s in res.items():
        assert STAT_KEYS <= set(s)
        assert s["batch_size"] == b and s["iters"] == 30 and s["warmup"] == 3
        assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"]
        assert s["p99_ms"] <= s["max_ms"]
        assert s["throughput_qps"] == pytest.approx(b * 1000 / s["mean_ms"])
        assert s["cv"] == pytest.approx(s["std_ms"] / s["mean_ms"])
        assert s["threads"] == 1 and s["inter_threads"] == 1
        assert s["execution_provider"] == "CPUExecutionProvider"
        assert s["mem_source"] in ("rss_peak_delta", "rss_delta", None)
        assert s["peak_mem_mb"] is None or s["peak_mem_mb"] >= 0
        assert "profile" not in s


def test_time_budget_stops_early_but_keeps_ten_samples(mlp):
    res = measure_latency(mlp, warmup=0, iters=10_000, time_budget_s=1e-6)
    assert res[1]["iters"] == 10


def test_summarize_known_values():
    s = summarize([float(v) for v in range(1, 101)], batch_size=2)
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5)
    assert s["min_ms"] == 1.0 and s["max_ms"] == 100.0
    assert s["throughput_qps"] == pytest.approx(2000 / 50.5)
    with pytest.raises(ValueError, match="at least one timing"):
        summarize([], 1)


def test_make_feed_repeats_given_inputs_to_the_batch(mlp):
    session = load_session(mlp)
    given = np.stack([np.zeros(32), np.ones(32)]).astype(np.float32)
    feed = make_feed(session, 5, given)
    assert feed["input"].shape == (5, 32)
    assert feed["input"][:, 0].tolist() == [0, 1, 0, 1, 0]
    random = make_feed(session, 3)["input"]
    assert random.shape == (3, 32) and random.dtype == np.float32 and random.std() > 0.5


def test_fixed_batch_and_symbolic_dims_are_user_errors(tmp_path):
    fixed = write_mlp(tmp_path / "fixed.onnx", batch=1)
    assert measure_latency(fixed, iters=2, warmup=0)[1]["iters"] == 2
    with pytest.raises(UserError, match="input 'input' has a fixed batch of 1; cannot time "
                                        "batch 4 \\(export with a dynamic batch\\)"):
        measure_latency(fixed, batch_sizes=(4,), iters=2)
    symbolic = write_mlp(tmp_path / "sym.onnx", features="f")
    with pytest.raises(UserError, match="symbolic dimensions .*pass example inputs"):
        measure_latency(symbolic, iters=2)
    ok = measure_latency(symbolic, iters=2, warmup=0, inputs=np.ones((1, 32), np.float32))
    assert ok[1]["iters"] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_sizes": (0,)}, r"batch sizes must be integers >= 1; got \[0\]"),
        ({"batch_sizes": (1.5,)}, r"batch sizes must be integers >= 1; got \[1.5\]"),
        ({"iters": 0}, "'iters' must be >= 1; got 0"),
        ({"warmup": -1}, "'warmup' must be >= 0; got -1"),
        ({"time_budget_s": 0}, "'time_budget_s' must be > 0; got 0"),
        ({"provider": "npu"}, "unknown provider 'npu'; expected one of cpu, cuda, tensorrt"),
        ({"threads": 0}, "'threads' must be >= 1; got 0"),
    ],
)
def test_bad_arguments_are_user_errors(mlp, kwargs, message):
    with pytest.raises(UserError, match=message):
        measure_latency(mlp, **kwargs)


def test_profile_lists_top_op_types_and_deletes_its_file(mlp):
    before = set(Path(tempfile.gettempdir()).glob("distill_prof_*"))
    res = measure_latency(mlp, warmup=2, iters=20, profile=True)
    prof = res[1]["profile"]
    ops = [p["op_type"] for p in prof]
    assert ops and len(ops) == len(set(ops))
    # ORT may fuse MatMul+Add into a Gemm-like kernel: some matrix product must be there.
    assert any("MatMul" in op or "Gemm" in op for op in ops)
    assert [p["total_ms"] for p in prof] == sorted((p["total_ms"] for p in prof), reverse=True)
    assert sum(p["share"] for p in prof) == pytest.approx(1.0, abs=1e-6)
    assert all(p["count"] >= 20 for p in prof)  # warm-up runs are left out, timed ones kept
    assert set(Path(tempfile.gettempdir()).glob("distill_prof_*")) == before


def test_subprocess_measurement_returns_the_same_structure(mlp, tmp_path):
    res = measure_latency(mlp, batch_sizes=(2,), warmup=1, iters=5, subprocess=True)
    assert STAT_KEYS <= set(res[2]) and res[2]["iters"] == 5
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="bad.onnx: not a loadable ONNX model"):
        measure_latency(bad, subprocess=True)


def test_torch_latency_on_cpu_restores_modes_and_threads():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model.train()
    threads = torch.get_num_threads()
    s = measure_torch_latency(model, torch.randn(3, 32), warmup=2, iters=15, threads=1)
    assert s["provider"] == "torch-cpu" and s["batch_size"] == 3 and s["iters"] == 15
    assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert model.training and torch.get_num_threads() == threads
    with pytest.raises(UserError, match="'iters' must be >= 1"):
        measure_torch_latency(model, torch.randn(1, 32), iters=0)


def test_missing_tensorrt_is_a_clear_user_error(mlp):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed")
    from distill.export.tensorrt import build_engine, measure_tensorrt_latency

    for call in (lambda: build_engine(mlp), lambda: measure_tensorrt_latency(mlp)):
        with pytest.raises(UserError, match=r"TensorRT is not installed .*pip install "
                                            r"'distill\[tensorrt\]'") as err:
            call()
        assert "\n" not in str(err.value)


def test_tensorrt_engine_times_a_dynamic_batch(mlp, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from distill.export.tensorrt import build_engine, measure_tensorrt_latency

    plan = tmp_path / "mlp.plan"
    build_engine(mlp, plan, max_batch=8)
    assert plan.stat().st_size > 0
    res = measure_tensorrt_latency(plan, batch_sizes=(1, 8), warmup=5, iters=20)
    for b, s in res.items():
        assert s["batch_size"] == b and s["iters"] == 20 and s["provider"] == "tensorrt-native"
        assert 0 < s["p50_ms"] <= s["p99_ms"]
