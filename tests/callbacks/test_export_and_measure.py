"""ExportAndMeasure in real ``Trainer.fit`` runs on bundled digits (real exporter and ORT)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from distill.callbacks.export_and_measure import ExportAndMeasure, weight_sparsity
from distill.errors import UserError
from distill.export.onnx import export_onnx
from distill.models import ResNetCNN
from distill.module import DistillationModule

FAST = {"warmup": 2, "iters": 10}


def make_module() -> DistillationModule:
    torch.manual_seed(0)
    student = ResNetCNN(1, 10, widths=(4, 8), blocks=1)
    return DistillationModule(student, None, 10, torch.zeros(1, 1, 16, 16),
                              optim={"lr": 0.01})


def make_trainer(root: Path, callbacks: list, max_epochs: int, logger=False) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs, limit_train_batches=4, callbacks=callbacks, logger=logger,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, default_root_dir=str(root),
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("eam")
    cb = ExportAndMeasure(out_dir=root / "run", batch_sizes=[1, 4], **FAST)
    module = make_module()
    trainer = make_trainer(root, [cb], max_epochs=2,
                           logger=CSVLogger(str(root), name="", version=""))
    trainer.fit(module, datamodule=digits)
    return trainer, module, cb, root


def test_each_epoch_yields_a_measured_row_and_an_onnx_file(fitted, digits):
    trainer, module, cb, root = fitted
    assert [r["epoch"] for r in cb.rows] == [0, 1]
    n_val = len(digits.dataset("val"))
    for row in cb.rows:
        path = root / "run" / "epochs" / f"epoch_{row['epoch']:03d}.onnx"
        assert row["onnx"] == str(path) and path.is_file()
        assert row["error"] is None
        assert row["parity_ok"] and row["parity_top1"] == 1.0 and row["parity_max_abs"] < 1e-3
        # what ships scores like the PyTorch student (ties in arg-max aside)
        assert abs(row["val_accuracy_onnx"] - row["val_accuracy"]) <= 2 / n_val
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert set(row["latency"]) == {"1", "4"}
        assert row["latency"]["1"]["p99_ms"] == row["p99_ms"]
        assert row["size_mb"] == pytest.approx(path.stat().st_size / 2**20, abs=1e-4)
        assert row["params"] == sum(p.numel() for p in module.student.parameters())
        assert row["sparsity"] == 0.0 and row["quantized"] is False
        assert isinstance(row["macs"], int) and row["macs"] > 0
    assert float(trainer.callback_metrics["latency/p99_ms"]) == pytest.approx(cb.rows[-1]["p99_ms"])


def test_metrics_reach_the_logger(fitted):
    _, _, cb, root = fitted
    with open(root / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in ("val/accuracy_onnx", "latency/p50_ms", "latency/p99_ms", "onnx/size_mb",
                 "parity/max_abs"):
        values = [float(r[name]) for r in rows if r.get(name)]
        assert len(values) == 2, name
    logged = [float(r["latency/p99_ms"]) for r in rows if r.get("latency/p99_ms")]
    assert logged == pytest.approx([r["p99_ms"] for r in cb.rows])


def test_state_dict_round_trips_as_plain_values(fitted, tmp_path):
    _, _, cb, _ = fitted
    torch.save(cb.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain values only
    fresh = ExportAndMeasure(out_dir=tmp_path)
    fresh.load_state_dict(state)
    assert fresh.rows == cb.rows and fresh.latest_row == cb.rows[-1]


def test_measure_restores_the_students_own_modes(fitted):
    trainer, module, cb, _ = fitted
    student = module.student.train()
    student.stem[1].eval()  # e.g. a frozen batch norm
    row = cb.measure(trainer, module)
    assert row["error"] is None and row["parity_ok"]
    assert student.training and not student.stem[1].training and student.fc.training


def test_every_n_epochs_the_last_epoch_the_exporter_hook_and_errors(tmp_path, digits):
    calls = []

    def exporter(student, path, example):
        calls.append(int(path.stem.split("_")[1]))
        if len(calls) == 1:
            raise RuntimeError("boom\nsecond line")
        export_onnx(student, path, example)
        return {"quantized": True}

    module = make_module()
    module.exporter = exporter
    cb = ExportAndMeasure(out_dir=tmp_path, every_n_epochs=2, **FAST)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3)
    with pytest.warns(UserWarning, match="ExportAndMeasure: epoch 1 failed: RuntimeError: boom"):
        trainer.fit(module, datamodule=digits)
    assert trainer.current_epoch == 3  # the failure did not stop training
    assert calls == [1, 2]  # epoch 1 (every 2nd) and epoch 2 (the last)
    failed, ok = cb.rows
    assert failed["error"] == "RuntimeError: boom" and failed["p99_ms"] is None
    assert ok["error"] is None and ok["quantized"] is True and ok["parity_ok"]


def test_weight_sparsity_counts_zero_conv_and_linear_weights():
    model = ResNetCNN(1, 10, widths=(4, 8), blocks=1)
    weights = [m.weight for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    total = sum(w.numel() for w in weights)
    with torch.no_grad():
        model.fc.weight.zero_()
    assert weight_sparsity(model) == pytest.approx(model.fc.weight.numel() / total)


def test_weight_sparsity_counts_removed_channels_against_the_original():
    from distill.callbacks.export_and_measure import weight_count

    big = ResNetCNN(1, 10, widths=(8, 16), blocks=1)
    small = ResNetCNN(1, 10, widths=(4, 8), blocks=1)  # what halving every width leaves
    expected = 1 - weight_count(small) / weight_count(big)
    assert weight_sparsity(small, weight_count(big)) == pytest.approx(expected)
    assert 0.6 < expected < 0.8  # halving channels removes ~3/4 of conv weights


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, "'every_n_epochs' must be an integer >= 1; got 0"),
        ({"batch_sizes": []}, r"'batch_sizes' must be integers >= 1; got \[\]"),
        ({"batch_sizes": [1, 0]}, r"'batch_sizes' must be integers >= 1; got \[1, 0\]"),
        ({"threads": 0}, "'threads' must be an integer >= 1; got 0"),
        ({"warmup": -1}, "'warmup' must be an integer >= 0; got -1"),
        ({"provider": "gpu"}, "unknown provider 'gpu'; expected one of cpu, cuda, tensorrt"),
        ({"parity_atol": 0}, "'parity_atol' must be > 0; got 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(UserError, match=message):
        ExportAndMeasure(**kwargs)


def test_tensorrt_timing_without_tensorrt_fails_at_construction():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed")
    with pytest.raises(UserError, match="TensorRT is not installed"):
        ExportAndMeasure(tensorrt=True)
