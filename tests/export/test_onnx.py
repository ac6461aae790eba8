"""ONNX export, parity and ORT accuracy on a tiny ResNet (real exporter, real ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.errors import UserError
from distill.export.latency import load_session
from distill.export.onnx import (
    count_quant_nodes,
    eval_mode,
    evaluate_onnx,
    export_onnx,
    parity_check,
)
from distill.models import ResNetCNN


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return ResNetCNN(1, 10, widths=(4, 8), blocks=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _tiny()
    # Make batch norm non-trivial, so a train-mode export (batch statistics) would differ.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.train()
    path = tmp_path_factory.mktemp("onnx") / "sub" / "model.onnx"
    info = export_onnx(model, path, torch.randn(1, 1, 16, 16))
    return model, path, info


def test_export_writes_one_checked_file_with_named_dynamic_io(exported):
    model, path, info = exported
    assert path.is_file()
    # one self-contained file, no temporary left behind, no external .data file
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    assert info["path"] == str(path)
    assert info["size_mb"] == pytest.approx(path.stat().st_size / 2**20)
    assert info["input_name"] == "input" and info["output_name"] == "logits"
    assert info["input_shape"] == ["batch", 1, 16, 16]
    assert info["output_shape"] == ["batch", 10]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == info["opset"] == 20
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "Gemm"} <= ops
    assert "BatchNormalization" not in ops  # eval export folds BN into the convolutions
    assert count_quant_nodes(path) == 0


def test_export_leaves_the_callers_model_untouched(exported):
    model, _, _ = exported
    assert model.training
    assert all(p.requires_grad for p in model.parameters())


def test_any_batch_size_matches_eager_eval(exported):
    model, path, _ = exported
    x = torch.randn(5, 1, 16, 16)
    session = load_session(path)
    got = session.run(None, {"input": x.numpy()})[0]
    with eval_mode(model), torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_parity_check_on_real_batches_and_detects_a_mismatch(exported):
    model, path, _ = exported
    torch.manual_seed(1)
    x, y = torch.randn(12, 1, 16, 16), torch.randint(0, 10, (12,))
    res = parity_check(model, path, (x, y))
    assert res["n"] == 12 and res["top1_agreement"] == 1.0
    assert res["max_abs"] < 1e-4
    assert model.training  # its mode is restored
    other = _tiny()
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    bad = parity_check(other, path, DataLoader(TensorDataset(x, y), batch_size=4),
                       max_batches=None)
    assert bad["n"] == 12
    assert bad["max_abs"] > 0.5


def test_evaluate_onnx_equals_eager_accuracy(exported):
    model, path, _ = exported
    torch.manual_seed(2)
    x = torch.randn(40, 1, 16, 16)
    with eval_mode(model), torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[::3] = (y[::3] + 1) % 10  # every third label wrong: accuracy 26/40
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    assert evaluate_onnx(path, loader) == pytest.approx(26 / 40)
    with pytest.raises(ValueError, match="empty loader"):
        evaluate_onnx(path, [])


def test_static_batch_export_still_scores_any_batch(tmp_path):
    model = _tiny()
    info = export_onnx(model, tmp_path / "static.onnx", torch.randn(1, 1, 16, 16),
                       dynamic_batch=False)
    assert info["input_shape"] == [1, 1, 16, 16]
    x = torch.randn(7, 1, 16, 16)
    with eval_mode(model), torch.no_grad():
        y = model(x).argmax(1)
    # 7 samples through a batch-1 model: run_session splits the batch
    assert evaluate_onnx(info["path"], [(x, y)]) == 1.0


class _BatchOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, 16))  # hard-codes the batch: no dynamic batch possible


def test_hard_coded_batch_is_refused_and_leaves_no_file(tmp_path):
    # The dynamo exporter would silently specialize the batch to 1; we refuse instead.
    path = tmp_path / "out" / "bad.onnx"
    with pytest.raises(RuntimeError, match="ONNX export of _BatchOne gave a fixed batch of 1: "
                                           ".*pass dynamic_batch=False"):
        export_onnx(_BatchOne(), path, torch.randn(1, 1, 4, 4))
    assert list(path.parent.iterdir()) == []


def test_eval_mode_restores_each_submodules_own_mode():
    model = _tiny().train()
    model.stem[1].eval()  # a frozen batch norm the user keeps in eval
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.stem[1].training and model.fc.training


def test_load_session_rejects_bad_files_with_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="ONNX file not found: .*missing.onnx"):
        load_session(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="not a file: "):
        load_session(tmp_path)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    with pytest.raises(UserError, match="notes.onnx: not a loadable ONNX model") as err:
        load_session(text)
    assert "\n" not in str(err.value)


def test_load_session_rejects_unknown_and_unavailable_providers(exported):
    _, path, _ = exported
    with pytest.raises(UserError, match=r"unknown provider 'gpu'; expected one of cpu, cuda, "
                                        r"tensorrt \(available here: cpu"):
        load_session(path, provider="gpu")
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    with pytest.raises(UserError, match="provider 'tensorrt' .* not available .*available "
                                        "here: cpu"):
        load_session(path, provider="tensorrt")
    with pytest.raises(UserError, match="'threads' must be >= 1; got 0"):
        load_session(path, threads=0)
