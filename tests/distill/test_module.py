from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from distill.errors import UserError
from distill.models import MODELS, build_model
from distill.module import DistillationModule

FEATURE = {
    "kd": {"weight": 1.0, "temperature": 4.0},
    "feature": {"weight": 1.0, "pairs": [{"student": "stages.1", "teacher": "stages.1"}]},
    "attention": {"weight": 1.0, "pairs": [{"student": "stages.0", "teacher": "stages.0"}]},
    "dkd": {"weight": 0.5},
}


def _pair(widths_s=(4, 8), widths_t=(8, 16)):
    s = build_model("resnet", 1, 10, widths=widths_s, blocks=1)
    t = build_model("resnet", 1, 10, widths=widths_t, blocks=1)
    return s, t


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_distills(name):
    kwargs = {"image_size": 16} if name == "mlp" else {}
    student = build_model(name, 1, 10, **kwargs)
    teacher = build_model("resnet", 1, 10, widths=(8, 16), blocks=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = DistillationModule(student, teacher, 10, torch.zeros(1, 1, 16, 16),
                           distill={"kd": {"weight": 1.0}})
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    total, terms, logits = m._losses(x, y)
    assert torch.isfinite(logits).all() and torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_teacher_is_not_a_submodule_and_not_optimized():
    s, t = _pair()
    m = DistillationModule(s, t, 10, torch.zeros(1, 1, 16, 16), distill=FEATURE)
    assert not any(k.startswith("teacher") or "_teacher" in k for k in m.state_dict())
    opt_params = {id(p) for g in m.configure_optimizers().param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in t.parameters()}
    assert {id(p) for p in s.parameters()} <= opt_params
    assert not t.training and not any(p.requires_grad for p in t.parameters())


def test_feature_adapters_follow_widths_and_hooks_are_removed():
    s, t = _pair()
    m = DistillationModule(s, t, 10, torch.zeros(1, 1, 16, 16), distill=FEATURE)
    (adapter,) = m.adapters.values()
    assert (adapter.in_channels, adapter.out_channels) == (8, 16)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    total, terms, _ = m._losses(x, y)
    assert set(terms) == {"task", "kd", "dkd", "feature", "attention"}
    assert all(v.item() >= 0 for v in terms.values())
    total.backward()
    assert adapter.weight.grad is not None
    for mod in list(s.modules()) + list(t.modules()):
        assert not mod._forward_hooks
    # a width change (as after pruning) gives a new adapter; a matching one is kept
    s.stages[1][0].conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    m.rebuild_adapters()
    assert m.adapters[next(iter(m.adapters))] is adapter


def test_unknown_layer_is_a_user_error():
    s, t = _pair()
    bad = {"feature": {"weight": 1.0, "pairs": [{"student": "stages.9", "teacher": "stages.1"}]}}
    with pytest.raises(UserError, match=r"student has no layer named 'stages.9'"):
        DistillationModule(s, t, 10, torch.zeros(1, 1, 16, 16), distill=bad)


def test_fit_keeps_teacher_frozen_and_student_learns(digits):
    s, t = _pair()
    t_before = {k: v.clone() for k, v in t.state_dict().items()}
    s_before = {k: v.clone() for k, v in s.state_dict().items()}
    m = DistillationModule(s, t, 10, torch.zeros(1, 1, 16, 16), distill=FEATURE,
                           optim={"lr": 1e-2})
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(m, datamodule=digits)
    assert all(torch.equal(t_before[k], v) for k, v in t.state_dict().items())
    assert any(not torch.equal(s_before[k], v) for k, v in s.state_dict().items())
    assert "val/accuracy" in trainer.callback_metrics
    assert "train/kd" in trainer.callback_metrics and "train/feature" in trainer.callback_metrics


def test_teacher_cache_runs_teacher_once_per_sample(digits):
    from distill.teacher_cache import TeacherCache

    s, t = _pair()
    calls = {"n": 0}
    t.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    m = DistillationModule(s, t, 10, torch.zeros(1, 1, 16, 16),
                           distill={"kd": {"weight": 1.0}, "cache_teacher": True})
    assert isinstance(m.teacher_cache, TeacherCache)
    trainer = pl.Trainer(max_epochs=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(m, datamodule=digits)
    n_train = len(digits.dataset("train"))
    train_batches = -(-n_train // digits.batch_size)
    assert calls["n"] == train_batches  # epoch 0 only; epochs 1-2 hit the cache
    assert len(m.teacher_cache) == n_train and m.teacher_cache.frozen
    # cached logits equal a fresh teacher pass
    x = digits.dataset("train").tensors[0][:5]
    np_cached = m.teacher_cache.logits(x, t)
    assert torch.allclose(np_cached, t(x), atol=1e-5)


def test_teacher_cache_refuses_changed_samples_and_feature_terms():
    from distill.teacher_cache import TeacherCache, check_deterministic

    cache = TeacherCache()
    t = build_model("resnet", 1, 10, widths=(4, 8), blocks=1).eval()
    cache.logits(torch.randn(4, 1, 8, 8), t)
    cache.frozen = True
    with pytest.raises(UserError, match="a training sample changed between epochs"):
        cache.logits(torch.randn(4, 1, 8, 8), t)

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.randn(1, 8, 8), 0

    with pytest.raises(UserError, match="without random augmentation"):
        check_deterministic(Augmented())
    s, t2 = _pair()
    with pytest.raises(ValueError, match="caches logits only"):
        DistillationModule(s, t2, 10, torch.zeros(1, 1, 16, 16),
                           distill={**FEATURE, "cache_teacher": True})


def test_epoch_metrics_are_the_weighted_means_of_the_steps(digits, tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    s, t = _pair()
    m = DistillationModule(s, t, 10, torch.zeros(1, 1, 16, 16),
                           distill={"kd": {"weight": 1.0, "temperature": 4.0}})
    seen = []  # (batch size, loss, correct) of every step, recomputed outside the module

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            x, y = batch
            seen.append((len(y), float(outputs["loss"]), int((module._last_pred == y).sum())))

    real = m._losses

    def losses(x, y):
        total, terms, logits = real(x, y)
        m._last_pred = logits.argmax(1)
        return total, terms, logits

    m._losses = losses
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0,
                         logger=CSVLogger(tmp_path), log_every_n_steps=2, callbacks=[Spy()],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(m, datamodule=digits)
    n = sum(b for b, _, _ in seen)
    loss = sum(b * v for b, v, _ in seen) / n
    acc = sum(c for _, _, c in seen) / n
    got = trainer.callback_metrics
    assert float(got["train/loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(got["train/accuracy"]) == pytest.approx(acc, abs=1e-6)
    assert {"train/task", "train/kd"} <= set(got)
    # per-step rows reach the logger at its cadence (steps 2 and 4), not at every step
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == [1, 3]
    assert [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")] == \
        pytest.approx([seen[1][1], seen[3][1]], rel=1e-5)
