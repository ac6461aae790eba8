"""TargetStop: the decision table, delivery choice, and real fits that stop (or don't)."""

from __future__ import annotations

import re

import pytest
import pytorch_lightning as pl
import torch

from distill.callbacks.export_and_measure import ExportAndMeasure
from distill.callbacks.target_stop import TargetStop
from distill.errors import UserError
from distill.models import ResNetCNN
from distill.module import DistillationModule


def row(epoch=0, acc=0.95, onnx_acc=None, p99=1.0, size=0.5, error=None, parity_ok=True):
    return {"epoch": epoch, "val_accuracy": acc, "val_accuracy_onnx": onnx_acc, "p99_ms": p99,
            "size_mb": size, "error": error, "parity_ok": parity_ok, "parity_max_abs": 1e-6,
            "onnx": f"epochs/epoch_{epoch:03d}.onnx"}


@pytest.mark.parametrize(
    ("targets", "r", "stop", "reason"),
    [
        ({"accuracy": 0.9, "p99_ms": 2.0}, row(), True,
         "epoch 0: targets met: accuracy 0.9500 >= 0.9000; p99 1.000 ms <= 2 ms"),
        ({"accuracy": 0.96}, row(), False, "epoch 0: not met: accuracy 0.9500 < 0.9600"),
        ({"accuracy": 0.9, "p99_ms": 0.5}, row(), False, "not met: p99 1.000 ms > 0.5 ms"),
        ({"size_mb": 0.25}, row(), False, "not met: size 0.500 MB > 0.25 MB"),
        ({"size_mb": 0.5}, row(), True, "targets met: size 0.500 MB <= 0.5 MB"),
        # the ONNX accuracy (what ships) wins over the PyTorch one
        ({"accuracy": 0.9}, row(acc=0.95, onnx_acc=0.85), False, "accuracy 0.8500 < 0.9000"),
        ({"accuracy": 0.9}, row(acc=0.80, onnx_acc=0.92), True, "accuracy 0.9200 >= 0.9000"),
        # relative target: teacher 0.98, at most 2 points below -> 0.96
        ({"max_accuracy_drop": 2.0, "teacher_accuracy": 0.98}, row(acc=0.955), False,
         "accuracy 0.9550 < 0.9600"),
        ({"max_accuracy_drop": 2.0, "teacher_accuracy": 0.98}, row(acc=0.961), True,
         "accuracy 0.9610 >= 0.9600"),
        # with both, the stricter applies
        ({"accuracy": 0.97, "max_accuracy_drop": 2.0, "teacher_accuracy": 0.98}, row(acc=0.965),
         False, "accuracy 0.9650 < 0.9700"),
        ({"p99_ms": 2.0}, row(p99=None), False, "p99 n/a ms > 2 ms"),
        ({"p99_ms": 2.0}, row(error="RuntimeError: boom"), False,
         r"epoch 0: measurement failed \(RuntimeError: boom\)"),
        ({"p99_ms": 2.0}, row(parity_ok=False), False, "ONNX parity check failed"),
        ({"p99_ms": 2.0}, None, False, "no measurement"),
        ({}, row(), False, "no targets set"),
    ],
)
def test_decision_table(targets, r, stop, reason):
    decided, why = TargetStop(**targets)._should_stop(r)
    assert decided is stop
    assert re.search(reason, why), why


def test_parity_failure_can_be_accepted_explicitly():
    assert TargetStop(p99_ms=2.0, require_parity=False)._should_stop(row(parity_ok=False))[0]


def test_confirmation_is_needed_only_near_the_p99_target():
    stopper = TargetStop(p99_ms=2.0, confirm_margin=0.1)
    assert stopper._needs_confirm(row(p99=1.85))
    assert not stopper._needs_confirm(row(p99=1.75))
    assert not TargetStop(p99_ms=2.0, confirm_margin=0.0)._needs_confirm(row(p99=1.99))
    assert not TargetStop(accuracy=0.9)._needs_confirm(row(p99=1.99))


def test_choose_delivery():
    rows = [row(0, acc=0.90, p99=3.0), row(1, acc=0.97, p99=3.0),
            row(2, acc=0.93, p99=1.5), row(3, acc=0.99, error="RuntimeError: x"),
            row(4, acc=0.94, p99=1.4)]
    # met: the first epoch meeting everything
    chosen, why = TargetStop(accuracy=0.93, p99_ms=2.0).choose_delivery(rows)
    assert chosen["epoch"] == 2 and why == "epoch 2 met the targets"
    # none met: the most accurate one within the latency target
    chosen, why = TargetStop(accuracy=0.98, p99_ms=2.0).choose_delivery(rows)
    assert chosen["epoch"] == 4 and "most accurate that meets the latency/size targets" in why
    # nothing feasible: the most accurate, never the errored row
    chosen, why = TargetStop(accuracy=0.98, p99_ms=1.0).choose_delivery(rows)
    assert chosen["epoch"] == 1 and why == "no epoch met the targets; epoch 1 is the most accurate"
    chosen, why = TargetStop().choose_delivery(rows)
    assert chosen["epoch"] == 1 and why.startswith("no target was set")
    # accuracy ties go to the lower p99
    tie = [row(0, acc=0.9, p99=2.0), row(1, acc=0.9, p99=1.0)]
    assert TargetStop(p99_ms=0.5).choose_delivery(tie)[0]["epoch"] == 1
    assert TargetStop().choose_delivery([row(0, error="x")]) == (
        None, "no epoch was exported and measured without error")


def test_choose_delivery_prefers_the_recorded_stop_epoch():
    stopper = TargetStop(accuracy=0.9)
    stopper.load_state_dict({"met_at_epoch": 1, "stop_reason": "epoch 1: targets met",
                             "last_reason": None})
    chosen, why = stopper.choose_delivery([row(0), row(1), row(2)])
    assert chosen["epoch"] == 1 and why.startswith("epoch 1 met the targets")
    assert stopper.state_dict()["met_at_epoch"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accuracy": 1.5}, r"'accuracy' must be in \[0, 1\]; got 1.5"),
        ({"p99_ms": 0}, "'p99_ms' must be > 0; got 0"),
        ({"size_mb": -1}, "'size_mb' must be > 0; got -1"),
        ({"max_accuracy_drop": 1.0}, "'max_accuracy_drop' needs the teacher's accuracy"),
        ({"confirm_margin": 1.0}, r"'confirm_margin' must be in \[0, 1\); got 1.0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        TargetStop(**kwargs)


# ----- real fits ------------------------------------------------------------------------


def fit(tmp_path, digits, stopper, max_epochs=3, order="measure_first"):
    torch.manual_seed(0)
    student = ResNetCNN(1, 10, widths=(4, 8), blocks=1)
    module = DistillationModule(student, None, 10, torch.zeros(1, 1, 16, 16),
                                optim={"lr": 0.01})
    measure = ExportAndMeasure(out_dir=tmp_path, warmup=2, iters=10)
    callbacks = [measure, stopper] if order == "measure_first" else [stopper, measure]
    trainer = pl.Trainer(
        max_epochs=max_epochs, limit_train_batches=4, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=digits)
    return trainer, measure


def test_reachable_targets_stop_early_after_a_confirmed_p99(tmp_path, digits):
    # confirm_margin 0.999999: any p99 above 1 us counts as "near" the 1 s target, forcing a
    # second timing
    stopper = TargetStop(accuracy=0.05, p99_ms=1000.0, confirm_margin=0.999999)
    trainer, measure = fit(tmp_path, digits, stopper, max_epochs=3)
    assert stopper.met_at_epoch == 0
    assert trainer.current_epoch < 3 - 1 and len(measure.rows) == 1
    assert "targets met" in stopper.stop_reason
    assert "p99 confirmed by a second measurement" in stopper.stop_reason
    chosen, why = stopper.choose_delivery(measure.rows)
    assert chosen["epoch"] == 0 and why.startswith("epoch 0 met the targets")


def test_unreachable_p99_runs_to_max_epochs(tmp_path, digits):
    stopper = TargetStop(accuracy=0.05, p99_ms=1e-6)
    trainer, measure = fit(tmp_path, digits, stopper, max_epochs=2)
    assert trainer.current_epoch == 2 and [r["epoch"] for r in measure.rows] == [0, 1]
    assert stopper.met_at_epoch is None
    assert "not met: p99" in stopper.last_reason
    chosen, why = stopper.choose_delivery(measure.rows)
    assert why.startswith("no epoch met the targets")
    assert chosen["val_accuracy_onnx"] == max(r["val_accuracy_onnx"] for r in measure.rows)


def test_needs_export_and_measure_before_it(tmp_path, digits):
    with pytest.raises(UserError, match="TargetStop must come after ExportAndMeasure"):
        fit(tmp_path, digits, TargetStop(p99_ms=1.0), order="stop_first")
    lonely = pl.Trainer(max_epochs=1, callbacks=[TargetStop(p99_ms=1.0)], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)
    module = DistillationModule(ResNetCNN(1, 10, widths=(4, 8)), None, 10,
                                torch.zeros(1, 1, 16, 16))
    with pytest.raises(UserError, match="TargetStop needs an ExportAndMeasure callback"):
        lonely.fit(module, datamodule=digits)


def test_resume_keeps_rows_and_the_stop_epoch(tmp_path, digits):
    from pytorch_lightning.callbacks import ModelCheckpoint

    def run(max_epochs, ckpt_path=None):
        torch.manual_seed(0)
        module = DistillationModule(ResNetCNN(1, 10, widths=(4, 8), blocks=1), None, 10,
                                    torch.zeros(1, 1, 16, 16), optim={"lr": 0.01})
        measure = ExportAndMeasure(out_dir=tmp_path, warmup=2, iters=10)
        stopper = TargetStop(accuracy=0.01, p99_ms=1000.0, confirm_margin=0.0)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
        trainer = pl.Trainer(
            max_epochs=max_epochs, limit_train_batches=2, callbacks=[measure, stopper, ckpt],
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, accelerator="cpu", devices=1,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(module, datamodule=digits, ckpt_path=ckpt_path)
        return measure, stopper

    measure, stopper = run(max_epochs=3)
    assert stopper.met_at_epoch == 0 and [r["epoch"] for r in measure.rows] == [0]
    measure, stopper = run(max_epochs=3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # the restored rows continue; the first epoch that met the targets is remembered
    assert [r["epoch"] for r in measure.rows] == [0, 1]
    assert stopper.met_at_epoch == 0 and stopper.stop_reason.startswith("epoch 0: targets met")
