"""Faults inside a run and while writing artifacts.

- An epoch whose export crashes mid-write, whose ONNX fails the parity check, or whose
  benchmark fails is recorded (``error`` / ``parity_ok`` in its row), training goes on, and
  the delivered ``student.onnx`` is the last good export.
- A NaN loss stops the run with one line and exit code 1, before the bad update, keeping the
  last good checkpoint.
- A failed write (the disk fills up, the exporter crashes) never leaves a half-written file
  under a final name, and the previous artifact stays intact.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import onnx
import pytest
import torch

import distill.io
from distill.cli import main
from distill.guards import NonFiniteLossGuard, TrainingDiverged
from distill.io import atomic_copy, atomic_path, atomic_write_json
from distill.models import ResNetCNN, build_model


class DivergingNet(ResNetCNN):
    """A tiny ResNet whose logits turn NaN from its ``nan_after + 1``-th training forward."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, nan_after: int = 3,
                 widths: tuple[int, ...] = (4, 8), blocks: int = 1) -> None:
        super().__init__(in_channels, num_classes, widths=widths, blocks=blocks)
        self.nan_after = nan_after
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.nan_after:
                out = out * float("nan")
        return out


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_model("resnet", 1, 10, widths=(8, 16), blocks=1).state_dict(), path)
    return path


def tiny(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "data.image_size=8", "teacher.name=resnet",
        "teacher.kwargs={widths: [8, 16], blocks: 1}", f"teacher.checkpoint={teacher}",
        "student.name=resnet", "student.kwargs={widths: [4, 8], blocks: 1}",
        "trainer.limit_train_batches=3", "trainer.enable_progress_bar=false",
        "logger.wandb=false", "export.iters=5", "export.warmup=1",
        "targets.p99_ms=null", "targets.max_accuracy_drop=null", f"output_dir={out}", *extra,
    ]


def test_failed_epochs_are_recorded_and_the_last_good_export_is_delivered(
        tmp_path, teacher_pt, monkeypatch):
    """Epoch 1: the exporter crashes mid-write. Epoch 2: the ONNX disagrees with PyTorch.
    Epoch 3: the benchmark fails. Only epoch 0 is good: it is the one delivered."""
    import distill.callbacks.export_and_measure as em

    real_export, real_parity, real_latency = em.export_onnx, em.parity_check, em.measure_latency

    def export(student, path, example, **kwargs):
        if Path(path).name == "epoch_001.onnx":
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"\x08\x07half an onnx file")
                raise RuntimeError("simulated exporter crash")
        return real_export(student, path, example, **kwargs)

    def parity(student, path, batch, **kwargs):
        out = real_parity(student, path, batch, **kwargs)
        return {**out, "max_abs": 0.5} if Path(path).name == "epoch_002.onnx" else out

    def latency(path, *args, **kwargs):
        if Path(path).name == "epoch_003.onnx":
            raise OSError("simulated: benchmark process died")
        return real_latency(path, *args, **kwargs)

    monkeypatch.setattr(em, "export_onnx", export)
    monkeypatch.setattr(em, "parity_check", parity)
    monkeypatch.setattr(em, "measure_latency", latency)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="ExportAndMeasure: epoch 1 failed: RuntimeError: "
                                         "simulated exporter crash"):
        assert main(tiny(teacher_pt, run, "trainer.max_epochs=4")) == 0

    report = json.loads((run / "report.json").read_text())
    rows = {r["epoch"]: r for r in report["epochs"]}
    assert sorted(rows) == [0, 1, 2, 3] and report["epochs_trained"] == 4  # training went on
    assert rows[0]["error"] is None and rows[0]["parity_ok"] is True
    assert rows[1]["error"] == "RuntimeError: simulated exporter crash" and rows[1]["onnx"] is None
    assert rows[2]["error"] is None and rows[2]["parity_ok"] is False
    assert rows[3]["error"] == "OSError: simulated: benchmark process died"
    # The crashed write left nothing: no final file and no temporary.
    assert sorted(p.name for p in (run / "epochs").iterdir()) == [
        "epoch_000.onnx", "epoch_002.onnx", "epoch_003.onnx"]
    # Delivered: the last good export, byte for byte.
    assert report["delivered"]["epoch"] == 0
    assert (run / "student.onnx").read_bytes() == (run / "epochs" / "epoch_000.onnx").read_bytes()
    assert report["student"]["epoch"] == 0
    md = (run / "report.md").read_text()
    assert "| 1 |" in md and "RuntimeError: simulated exporter crash" in md


def test_nan_loss_stops_with_one_line_exit_1_and_keeps_the_last_good_checkpoint(
        tmp_path, teacher_pt, capsys):
    run = tmp_path / "run"
    args = tiny(teacher_pt, run, "trainer.max_epochs=3", "trainer.limit_train_batches=2",
                "export.enabled=false", "student.name=null",
                "student._target_=tests.test_faults.DivergingNet",
                "student.kwargs={nan_after: 3}")
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert len(err.splitlines()) == 1, err
    assert err == (f"error: training diverged: the training loss is nan at epoch 1, step 3; "
                   f"stopped before the update, the last good checkpoint is kept: {ckpt}; "
                   "lower optim.lr or set trainer.gradient_clip_val")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values()
               if v.is_floating_point())
    assert not (run / "report.json").exists() and not (run / "student.onnx").exists()


def test_guard_decision_and_arguments():
    assert NonFiniteLossGuard._is_finite(torch.tensor(1.5))
    assert not NonFiniteLossGuard._is_finite(torch.tensor(float("inf")))
    assert not NonFiniteLossGuard._is_finite(torch.tensor([1.0, math.nan]))
    assert not NonFiniteLossGuard._is_finite(float("nan"))
    with pytest.raises(ValueError, match="NonFiniteLossGuard: 'hint' must be a string; got 3"):
        NonFiniteLossGuard(hint=3)
    assert TrainingDiverged("x").exit_code == 1


# ----- writes that fail ---------------------------------------------------------------------
def _disk_full_after(n_bytes: int):
    """An ``open`` whose files accept ``n_bytes`` and then raise ENOSPC, like a full disk."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:n_bytes])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    return fake_open


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_disk_full_keeps_the_previous_report(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"version": 1, "epochs": [0, 1]})
    before = path.read_bytes()
    monkeypatch.setattr(distill.io, "open", _disk_full_after(10), raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write_json(path, {"version": 2, "epochs": list(range(1000))})
    assert path.read_bytes() == before and json.loads(before)["version"] == 1
    assert _leftovers(tmp_path) == []


def test_disk_full_while_copying_the_delivered_model(tmp_path, monkeypatch):
    src, dst = tmp_path / "epoch_003.onnx", tmp_path / "student.onnx"
    src.write_bytes(b"new model " * 1000)
    dst.write_bytes(b"old model")

    def copy_half(a, b, *args, **kwargs):
        Path(b).write_bytes(Path(a).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(b))

    monkeypatch.setattr(shutil, "copyfile", copy_half)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_copy(src, dst)
    assert dst.read_bytes() == b"old model"
    assert _leftovers(tmp_path) == []


def test_exporter_crash_mid_write_keeps_the_previous_onnx(tmp_path, monkeypatch):
    from distill.export.onnx import export_onnx

    model = build_model("resnet", 1, 10, widths=(4, 8), blocks=1)
    example = torch.zeros(1, 1, 8, 8)
    path = tmp_path / "student.onnx"
    export_onnx(model, path, example)
    before = path.read_bytes()

    def half_then_full(net, args, f, *rest, **kwargs):
        Path(f).write_bytes(before[: len(before) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", half_then_full)
    with pytest.raises(RuntimeError, match="ONNX export of ResNetCNN failed.*No space left"):
        export_onnx(model, path, example)
    assert path.read_bytes() == before
    onnx.checker.check_model(str(path), full_check=True)
    assert _leftovers(tmp_path) == []


def test_disk_full_during_a_run_is_one_line_exit_1(tmp_path, teacher_pt, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(distill.io, "open", _disk_full_after(0), raising=False)
    assert main(tiny(teacher_pt, run, "trainer.max_epochs=1", "export.enabled=false")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: no space left on device; every file already under its "
                          "final name is complete")
    assert [p.name for p in run.iterdir()] == []  # recipe.yaml was the first write: nothing
