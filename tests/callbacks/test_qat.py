"""QuantizationAwareTraining in real Trainer.fit runs: phases, observers, resume, INT8 export."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from distill.callbacks.qat import (
    Int8Exporter,
    QuantizationAwareTraining,
    fake_quantizers,
    is_prepared,
)
from distill.export.onnx import evaluate_onnx
from distill.export.quantize import fused_op_report
from distill.models import ResNetCNN
from distill.module import DistillationModule

EXAMPLE = torch.zeros(1, 1, 16, 16)


def _snapshot(student):
    return [b.detach().clone() for fq in fake_quantizers(student) for b in fq.buffers()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class Probe(pl.Callback):
    """Records what the QAT callback (listed before it) did, hook by hook."""

    def __init__(self):
        self.val_unchanged, self.train_changed, self.bn_training, self.lrs = [], {}, {}, {}
        self.start_state = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.start_state = _snapshot(pl_module.student)
        self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if is_prepared(pl_module.student):
            self.bn_training[trainer.current_epoch] = [
                n.args[5] for n in pl_module.student.graph.nodes if "batch_norm" in str(n.target)]

    def on_train_epoch_end(self, trainer, pl_module):
        if is_prepared(pl_module.student):
            self.train_changed[trainer.current_epoch] = not _same(
                self.start_state, _snapshot(pl_module.student))

    def on_validation_epoch_start(self, trainer, pl_module):
        self._val = _snapshot(pl_module.student)

    def on_validation_epoch_end(self, trainer, pl_module):
        if is_prepared(pl_module.student):
            self.val_unchanged.append(_same(self._val, _snapshot(pl_module.student)))


def _pretrained_student(dm):
    """A tiny ResNet trained briefly in FP32, so INT8 vs fake-quant parity is meaningful."""
    torch.manual_seed(0)
    student = ResNetCNN(1, 10, widths=(8, 16), blocks=1)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(6):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(student(x), y).backward()
            opt.step()
    return student


def _module(student, teacher=None):
    teacher = teacher if teacher is not None else ResNetCNN(1, 10, widths=(8, 16), blocks=1)
    return DistillationModule(student, teacher, 10, EXAMPLE,
                              distill={"kd": {"weight": 1.0, "temperature": 4.0}},
                              optim={"name": "adamw", "lr": 1e-3, "scheduler": "cosine"})


def _trainer(max_epochs, callbacks, **kw):
    return pl.Trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=2,
                      callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


@pytest.fixture(scope="module")
def qat_run(digits, tmp_path_factory):
    """Epochs 0-1 (prepare at 1), checkpoint, then a resumed fit for epoch 2 (freezes)."""
    tmp = tmp_path_factory.mktemp("qat")
    pre = _pretrained_student(digits)
    float_acc = evaluate_float(pre, digits)
    teacher = copy.deepcopy(pre)  # self-distillation: a trained teacher keeps accuracy up
    module, cb, probe = _module(pre, teacher), _qat_callback(), Probe()
    ckpt = ModelCheckpoint(dirpath=tmp, save_last=True, save_top_k=0)
    _trainer(2, [cb, probe, ckpt], enable_checkpointing=True).fit(module, datamodule=digits)
    saved = torch.load(tmp / "last.ckpt", weights_only=False)
    state_after_fit1 = cb.state_dict()

    resumed = _module(ResNetCNN(1, 10, widths=(8, 16), blocks=1), teacher)
    cb2, probe2 = _qat_callback(), Probe()
    _trainer(3, [cb2, probe2], enable_checkpointing=False).fit(
        resumed, datamodule=digits, ckpt_path=tmp / "last.ckpt")
    return dict(module=module, cb=cb, probe=probe, saved=saved, state1=state_after_fit1,
                resumed=resumed, cb2=cb2, probe2=probe2, float_acc=float_acc, tmp=tmp)


def _qat_callback():
    return QuantizationAwareTraining("qat", start_epoch=1, calib_batches=2, freeze_bn_epoch=2,
                                     freeze_observer_epoch=2, lr_scale=0.1,
                                     float_fan_in_below=0)


def evaluate_float(model, dm):
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in dm.val_dataloader())
    model.train()
    return correct / len(dm.dataset("val"))


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="mode must be one of qat, ptq_static, ptq_dynamic"):
        QuantizationAwareTraining("int4")
    with pytest.raises(ValueError, match="target must be one of onnxruntime, tensorrt"):
        QuantizationAwareTraining(target="openvino")
    with pytest.raises(ValueError, match=r"freeze_bn_epoch \(1\) must be >= start_epoch \(2\)"):
        QuantizationAwareTraining(start_epoch=2, freeze_bn_epoch=1)
    with pytest.raises(ValueError, match="calib_batches must be >= 1"):
        QuantizationAwareTraining(calib_batches=0)
    with pytest.raises(ValueError, match="lr_scale must be > 0"):
        QuantizationAwareTraining(lr_scale=0)
    with pytest.raises(ValueError, match="mode 'qat' needs calibration batches"):
        Int8Exporter("qat", [])


def test_schedule_decisions_are_pure_and_ordered():
    cb = QuantizationAwareTraining("qat", start_epoch=1, freeze_bn_epoch=2,
                                   freeze_observer_epoch=3)
    assert cb.steps_due(0) == []
    assert cb.steps_due(1) == ["prepare", "calibrate"]
    cb.epochs.update(prepare=1, calibrate=1)
    assert cb.steps_due(2) == ["freeze_bn"]
    cb.epochs["freeze_bn"] = 2
    assert cb.steps_due(3) == ["freeze_observers"] and cb.steps_due(5) == ["freeze_observers"]
    ptq = QuantizationAwareTraining("ptq_static", start_epoch=2)
    assert ptq.steps_due(1) == [] and ptq.steps_due(2) == ["int8_export"]


def test_phases_run_in_a_real_fit(qat_run):
    module, probe = qat_run["module"], qat_run["probe"]
    assert qat_run["state1"]["epochs"] == {"prepare": 1, "calibrate": 1}
    assert qat_run["state1"]["phase"] == "fake_quant"
    assert is_prepared(module.student) and not module.feature_hooks_enabled
    assert isinstance(module.exporter, Int8Exporter) and module.exporter.mode == "qat"
    # The optimizer was rebuilt over the prepared graph, at a tenth of the LR.
    opt_params = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.student.parameters()} <= opt_params
    # Cosine over 2 epochs halves the LR after epoch 0; QAT starts at 0.1x of that.
    assert probe.lrs[1] == pytest.approx(0.1 * 0.5 * probe.lrs[0])
    assert probe.bn_training[1] and all(probe.bn_training[1])  # BN still learns in epoch 1
    assert probe.train_changed[1]  # observers do move while training


def test_observers_never_change_during_validation(qat_run):
    assert qat_run["probe"].val_unchanged == [True]
    assert qat_run["probe2"].val_unchanged == [True, True]  # sanity check + epoch 2


def test_resume_restores_the_prepared_student_and_the_phase(qat_run):
    resumed, cb2, probe2, saved = qat_run["resumed"], qat_run["cb2"], qat_run["probe2"], \
        qat_run["saved"]
    assert is_prepared(resumed.student) and not resumed.feature_hooks_enabled
    # No second prepare/calibrate: the schedule continued where the checkpoint left it.
    assert cb2.epochs == {"prepare": 1, "calibrate": 1, "freeze_bn": 2, "freeze_observers": 2}
    assert isinstance(resumed.exporter, Int8Exporter)
    # Scales loaded from the checkpoint, not re-calibrated.
    fq_keys = [k for k in saved["state_dict"] if "activation_post_process" in k
               and k.endswith(".scale")]
    assert fq_keys
    # Epoch 2 froze BN and observers: BN uses running stats, ranges stay put while training.
    assert probe2.bn_training[2] and not any(probe2.bn_training[2])
    assert probe2.train_changed[2] is False
    state = resumed.student.state_dict()
    for key in fq_keys:
        assert torch.equal(state[key.removeprefix("student.")], saved["state_dict"][key])


def test_int8_export_is_fully_fused_and_matches_fake_quant(qat_run, digits, tmp_path):
    module = qat_run["resumed"]
    info = module.exporter(module.student, tmp_path / "student.int8.onnx", module.example_input)
    assert info["quantized"] and info["mode"] == "qat" and info["overrides_unknown"] == []
    assert info["qat_weights"] == 7 and info["qat_activations"] >= 8
    rep = fused_op_report(info["path"])
    assert rep["float_compute"] == [] and rep["op_counts"]["QLinearConv"] == 6
    # Fake-quant torch (eval, observers off) vs the INT8 file in ONNX Runtime.
    student = module.student
    with torch.no_grad():
        fq = torch.cat([student(x).argmax(-1) for x, _ in digits.val_dataloader()])
    import onnxruntime as ort

    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    onnx_pred = torch.cat([torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]).argmax(-1)
                           for x, _ in digits.val_dataloader()])
    labels = torch.cat([y for _, y in digits.val_dataloader()])
    agreement = (fq == onnx_pred).float().mean().item()
    acc_fq = (fq == labels).float().mean().item()
    acc_onnx = evaluate_onnx(info["path"], digits.val_dataloader())
    assert acc_fq > 0.8  # a trained model, so the comparison means something
    # Measured: fake-quant 91.1%, ONNX 91.4%, agreement 99.2% (359 samples, 1 = 0.28 points).
    assert agreement >= 0.98 and abs(acc_onnx - acc_fq) <= 0.01
    assert acc_onnx >= qat_run["float_acc"] - 0.02  # INT8 stays close to the FP32 student


def test_ptq_static_sets_the_exporter_at_start_epoch_without_touching_the_student(digits,
                                                                                   tmp_path):
    student = ResNetCNN(1, 10, widths=(4, 8), blocks=1)
    module = _module(student)
    seen = {}

    class Look(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[trainer.current_epoch] = pl_module.exporter

    cb = QuantizationAwareTraining("ptq_static", start_epoch=1, calib_batches=1)
    _trainer(2, [cb, Look()], enable_checkpointing=False).fit(module, datamodule=digits)
    assert seen[0] is None and isinstance(seen[1], Int8Exporter)
    assert module.student is student and not is_prepared(student)
    assert module.feature_hooks_enabled
    info = module.exporter(module.student, tmp_path / "ptq.onnx", module.example_input)
    fused = fused_op_report(info["path"])  # 6 convs + the classifier, none left in float
    assert info["mode"] == "ptq_static" and fused["int8_compute"] == 7
    assert fused["float_compute"] == []
