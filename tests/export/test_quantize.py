"""INT8 ONNX with ONNX Runtime's quantizer: fusion, TensorRT shape, overrides, QDQ round trip."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from distill.export.onnx import export_onnx
from distill.export.quantize import (
    fused_op_report,
    qdq_structure,
    qdq_to_float,
    quantize_dynamic_ort,
    quantize_static_ort,
    quantized_activations,
)
from distill.models import build_model


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """The default student (resnet_student, 1x32x32) as FP32 ONNX, plus calibration data."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q") / "student.onnx"
    export_onnx(build_model("resnet_student", 1, 10), path, torch.zeros(1, 1, 32, 32))
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 1, 32, 32, generator=gen) for _ in range(2)]
    return path, calib


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def _q_params(path, tensor):
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return inits[q.input[1]], inits[q.input[2]]


def test_static_int8_of_default_student_runs_without_float_compute(fp32, tmp_path):
    path, calib = fp32
    info = quantize_static_ort(path, tmp_path / "q.onnx", calib)
    rep = fused_op_report(info["path"])
    assert rep["float_compute"] == []
    counts = rep["op_counts"]
    assert counts["QLinearConv"] == 9 and counts["QGemm"] == 1 and counts["QLinearAdd"] == 3
    # AdaptiveAvgPool2d(1) exports as ReduceMean, left float by ORT; rewritten, it fuses too.
    assert info["global_pools"] == 1 and counts["QLinearGlobalAveragePool"] == 1
    assert "ReduceMean" not in counts
    assert info["quantized"] and info["activation_type"] == "uint8" and info["calib_samples"] == 32
    x = calib[0].numpy()
    assert np.abs(_run(info["path"], x) - _run(path, x)).max() < 0.05  # INT8 tracks FP32


def test_float_fan_in_keeps_only_the_input_stem_in_float(fp32, tmp_path):
    path, calib = fp32
    info = quantize_static_ort(path, tmp_path / "q.onnx", calib, float_fan_in_below=16)
    (stem,) = info["float_nodes"]  # the 1->16 3x3 stem: fan-in 9; 1x1 shortcuts read int8
    assert fused_op_report(info["path"])["float_compute"] == [f"Conv:{stem}"]


def test_tensorrt_target_is_symmetric_with_per_channel_weights(fp32, tmp_path):
    path, calib = fp32
    info = quantize_static_ort(path, tmp_path / "trt.onnx", calib, target="tensorrt")
    s = qdq_structure(info["path"])
    assert s["all_zero_points_zero"] and s["num_q"] > 0
    assert set(s["zero_point_dtypes"]) <= {"int8", "int32"}  # int32: bias DQs
    assert len(s["weight_axes"]) == 10  # 9 Conv + 1 Gemm weights
    assert set(s["weight_axes"].values()) == {0}
    ort_target = qdq_structure(quantize_static_ort(path, tmp_path / "o.onnx", calib)["path"])
    assert not ort_target["all_zero_points_zero"] and "uint8" in ort_target["zero_point_dtypes"]


def test_overrides_set_scales_and_unknown_names_are_reported(fp32, tmp_path):
    path, calib = fp32
    overrides = {"input": {"scale": 0.05, "zero_point": 128}, "no_such_tensor": {
        "scale": 1.0, "zero_point": 0}}
    info = quantize_static_ort(path, tmp_path / "q.onnx", calib, overrides=overrides)
    scale, zp = _q_params(info["path"], "input")
    assert scale == pytest.approx(0.05) and zp == 128 and zp.dtype == np.uint8
    assert info["overrides_applied"] == 1 and info["overrides_unknown"] == ["no_such_tensor"]


def test_tensorrt_widens_an_asymmetric_override_to_symmetric(fp32, tmp_path):
    path, calib = fp32
    overrides = {"input": {"scale": np.float32(0.05), "zero_point": np.uint8(128)}}
    info = quantize_static_ort(path, tmp_path / "t.onnx", calib, target="tensorrt",
                               overrides=overrides)
    scale, zp = _q_params(info["path"], "input")
    # uint8 zp 128 covers [-6.4, 6.35]; the symmetric int8 range must cover 6.4.
    assert zp == 0 and zp.dtype == np.int8 and scale == pytest.approx(0.05 * 128 / 127)
    assert info["overrides_symmetrized"] == 1


def test_bad_arguments_fail_before_writing(fp32, tmp_path):
    path, calib = fp32
    out = tmp_path / "q.onnx"
    with pytest.raises(ValueError, match="target must be one of onnxruntime, tensorrt"):
        quantize_static_ort(path, out, calib, target="tflite")
    with pytest.raises(ValueError, match="calib_batches is empty"):
        quantize_static_ort(path, out, [])
    with pytest.raises(ValueError, match="needs both 'scale' and 'zero_point'"):
        quantize_static_ort(path, out, calib, overrides={"input": {"scale": 0.1}})
    with pytest.raises(ValueError, match="quantizes activations to uint8"):
        quantize_static_ort(path, out, calib, overrides={
            "input": {"scale": np.float32(0.1), "zero_point": np.int8(0)}})
    assert not out.exists() and not list(tmp_path.glob(".q.onnx*"))


def test_qdq_to_float_round_trip_reproduces_the_quantized_model(fp32, tmp_path):
    path, calib = fp32
    first = quantize_static_ort(path, tmp_path / "first.onnx", calib)["path"]
    split = qdq_to_float(first, tmp_path / "float.onnx")
    ops = {n.op_type for n in onnx.load(split["path"]).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert split["weights"] == 10 and split["activations"] == len(quantized_activations(first))
    per_channel = [v for v in split["overrides"].values() if "axis" in v[0]]
    assert len(per_channel) == 10 and all(len(v) > 1 for v in per_channel)
    # Re-quantize with random calibration: every range must come from the overrides.
    other = [torch.randn(4, 1, 32, 32) * 5]
    second = quantize_static_ort(split["path"], tmp_path / "second.onnx", other,
                                 overrides=split["overrides"])
    assert second["overrides_unknown"] == []
    for tensor in quantized_activations(first):
        s1, z1 = _q_params(first, tensor)
        s2, z2 = _q_params(second["path"], tensor)
        assert s1 == pytest.approx(s2) and z1 == z2
    x = calib[1].numpy()
    np.testing.assert_allclose(_run(second["path"], x), _run(first, x), atol=1e-5)


def test_dynamic_int8_quantizes_the_linear_layers(tmp_path):
    path = tmp_path / "mlp.onnx"
    export_onnx(build_model("mlp", 1, 10, image_size=8), path, torch.zeros(1, 1, 8, 8))
    info = quantize_dynamic_ort(path, tmp_path / "mlp.int8.onnx")
    rep = fused_op_report(info["path"])
    assert rep["float_compute"] == [] and rep["int8_compute"] == 3
    assert info["format"] == "dynamic" and info["size_mb"] < path.stat().st_size / 2**20 / 2
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    assert np.abs(_run(info["path"], x) - _run(path, x)).max() < 0.05
