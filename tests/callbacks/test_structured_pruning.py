"""StructuredPruning: channels really go, training goes on with the optimizer state carried."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.arch import (
    IMPORTANCES,
    apply_plan,
    count_macs_params,
    reshape_to_state_dict,
    score_channels,
    select_channels,
)
from distill.callbacks.schedules import make_schedule
from distill.callbacks.structured_pruning import StructuredPruning
from distill.errors import UserError
from distill.models import build_model

X = torch.zeros(1, 1, 16, 16)


def _student() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet", 1, 4, widths=(8, 16), blocks=1)


class Tiny(pl.LightningModule):
    """The contract in miniature: student, adapters, rebuild_adapters, Adam + cosine."""

    def __init__(self) -> None:
        super().__init__()
        self.student = _student()
        self.example_input = X.clone()
        self.adapters = nn.ModuleDict()
        self.rebuilds = 0
        self.rebuild_adapters()

    def rebuild_adapters(self) -> None:
        width = self.student.stem[0].out_channels
        if "stem" not in self.adapters or self.adapters["stem"].in_channels != width:
            self.adapters["stem"] = nn.Conv2d(width, 8, 1)
            self.rebuilds += 1

    def training_step(self, batch, batch_idx):
        x, y = batch
        hint = self.adapters["stem"](self.student.stem(x)).pow(2).mean()
        return nn.functional.cross_entropy(self.student(x), y) + 1e-3 * hint

    def configure_optimizers(self):
        params = list(self.student.parameters()) + list(self.adapters.parameters())
        opt = torch.optim.Adam(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_load_checkpoint(self, checkpoint):
        reshape_to_state_dict(self, checkpoint["state_dict"])


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16)


def _trainer(callbacks, max_epochs=2, **kwargs) -> pl.Trainer:
    args = dict(max_epochs=max_epochs, limit_train_batches=3, enable_progress_bar=False,
                logger=False, enable_checkpointing=False, enable_model_summary=False)
    return pl.Trainer(callbacks=callbacks, **{**args, **kwargs})


class Snapshot(Callback):
    """Records student weights, Adam state and LR at the start of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.taken = epoch, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.epoch:
            return
        opt = trainer.optimizers[0]
        names = {p: n for n, p in pl_module.named_parameters()}
        self.taken = {
            "weights": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "state": {names[p]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
            "lr": opt.param_groups[0]["lr"],
            "opt_params": {id(p) for g in opt.param_groups for p in g["params"]},
            "last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        }


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of ``before`` survive in ``after`` (rows are distinct random weights)."""
    return [next(i for i in range(len(before)) if torch.equal(before[i], row)) for row in after]


def test_prune_during_fit_shrinks_carries_state_and_keeps_learning():
    module, pruning = Tiny(), StructuredPruning("constant", target_sparsity=0.5, start_epoch=1)
    before, after = Snapshot(1), Snapshot(1)  # around the pruning callback (hooks run in order)
    macs_full = count_macs_params(module.student, X)[0]
    _trainer([before, pruning, after]).fit(module, _loader())
    s = module.student
    # channels physically removed, output layer intact
    assert s.stem[0].out_channels == 4 and s.stem[0].weight.shape == (4, 1, 3, 3)
    assert s.stages[1][0].conv1.weight.shape == (8, 4, 3, 3)
    assert (s.fc.in_features, s.fc.out_features) == (8, 4)
    assert s(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    assert pruning.history[-1]["macs"] < 0.5 * macs_full
    # Adam moments of the kept channels carried over by index
    pre, post = before.taken, after.taken
    key = "student.stem.0.weight"
    kept = _kept_rows(pre["weights"][key], post["weights"][key])
    assert len(kept) == 4 and len(set(kept)) == 4
    for moment in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(post["state"][key][moment], pre["state"][key][moment][kept])
    assert torch.equal(post["state"][key]["step"], pre["state"][key]["step"])
    # LR schedule progress and the current LR continue
    assert post["lr"] == pre["lr"] and post["last_epoch"] == pre["last_epoch"] == 1
    # the rebuilt optimizer holds the new parameters, adapters included
    current = {id(p) for p in module.parameters()}
    assert post["opt_params"] == current and not (pre["opt_params"] & post["opt_params"]) - current
    assert module.rebuilds == 2 and module.adapters["stem"].in_channels == 4
    # pruned layers keep learning after the prune
    for name, p in module.named_parameters():
        if name.startswith("student.") and name in post["weights"]:
            assert not torch.equal(p.detach(), post["weights"][name]), name


def test_importances_prune_and_ignore_layers_are_respected():
    batch = (torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,)))
    for importance in IMPORTANCES:
        s = _student()
        scores = score_channels(s, X, importance, ["fc", "stages.0.0.conv1"], batch)
        assert "stages.0.0.conv1" not in scores and "fc" not in scores
        apply_plan(s, X, select_channels(scores, {}, 0.5))
        assert s.stages[0][0].conv1.out_channels == 8, importance  # ignored
        assert s.stem[0].out_channels == 4 and s.fc.out_features == 4, importance
        assert s(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_select_channels_counts_against_original_widths():
    torch.manual_seed(0)
    scores = {"a": torch.rand(16), "b": torch.rand(64)}
    original = {"a": 16, "b": 64}
    plan = dict(select_channels(scores, original, 0.3))
    assert (len(plan["a"]), len(plan["b"])) == (16 - 11, 64 - 44)  # keep floor(n * 0.7)
    assert plan["a"] == sorted(torch.argsort(scores["a"])[:5].tolist())  # least important go
    # a second step from already pruned widths lands where one shot would
    pruned = {k: v[: original[k] - len(plan[k])] for k, v in scores.items()}
    step2 = dict(select_channels(pruned, original, 0.5))
    assert (11 - len(step2["a"]), 44 - len(step2["b"])) == (8, 32)
    # round_to keeps multiples; global prunes the total, and more where scores are low
    rounded = dict(select_channels(scores, original, 0.3, round_to=8))
    assert (16 - len(rounded["a"]), 64 - len(rounded["b"])) == (8, 40)
    low = {"a": torch.rand(16) * 0.1, "b": torch.rand(64) + 1}
    glob = dict(select_channels(low, original, 0.2, global_pruning=True))
    assert sum(map(len, glob.values())) == 80 - 64 and len(glob["a"]) == 15  # keeps >= 1
    assert select_channels(scores, original, 0.0) == []


def test_macs_target_searches_the_smallest_channel_ratio_that_reaches_it():
    torch.manual_seed(0)
    student = build_model("resnet", 1, 4, widths=(16, 32), blocks=1)
    pruning = StructuredPruning("constant", target_macs_reduction=0.6)
    decision = pruning.decide(student, X, 0.6)
    full = count_macs_params(student, X)[0]

    def macs_at(sparsity):
        probe = copy.deepcopy(student)
        scores = score_channels(copy.deepcopy(student), X, "l1", ["fc"])
        apply_plan(probe, X, select_channels(scores, pruning.original_widths, sparsity))
        return count_macs_params(probe, X)[0]

    found = decision["channel_sparsity"]
    assert 0.3 < found < 0.5  # MACs fall about quadratically with the width
    assert macs_at(found) <= 0.4 * full < macs_at(found - 0.01)
    apply_plan(student, X, decision["plan"])
    assert count_macs_params(student, X)[0] == macs_at(found)


def test_batch_granularity_and_taylor_prune_within_an_epoch():
    module = Tiny()
    pruning = StructuredPruning("linear", 0.0, 0.5, start_epoch=0, end_epoch=1,
                                importance="taylor", granularity="batch")
    _trainer([pruning], max_epochs=2).fit(module, _loader())
    in_epoch_0 = [h for h in pruning.history if h["epoch"] == 0]
    assert len(in_epoch_0) >= 2  # batches 1 and 2 of epoch 0 are 1/3 and 2/3 up the ramp
    levels = [h["sparsity"] for h in pruning.history]
    assert levels == sorted(levels) and len(set(levels)) == len(levels)
    assert pruning.sparsity == 0.5 and module.student.stem[0].out_channels == 4


def test_resume_continues_the_same_schedule(tmp_path):
    schedule = dict(schedule="cubic", target_sparsity=0.5, start_epoch=0, end_epoch=3)
    first = StructuredPruning(**schedule)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    _trainer([first, ckpt], max_epochs=2, enable_checkpointing=True).fit(Tiny(), _loader())
    assert 0 < first.sparsity < 0.5 and len(first.history) == 1
    # callback state is plain values and round-trips to the same schedule position
    clone = StructuredPruning(**schedule)
    clone.load_state_dict(first.state_dict())
    f = make_schedule("cubic", 0.0, 0.5, 0, 3)
    assert [clone.due(f(t)) for t in range(5)] == [first.due(f(t)) for t in range(5)]
    assert clone.state_dict() == first.state_dict()
    # a fresh module + callback resume from the pruned checkpoint and finish the ramp
    resumed, module = StructuredPruning(**schedule), Tiny()
    _trainer([resumed], max_epochs=4).fit(module, _loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.history[0] == first.history[0] and len(resumed.history) == 2
    # epoch 3's 0.5 needs no channel beyond epoch 2's 0.48 at these widths (8 and 16)
    assert resumed.history[1]["epoch"] == 2 and resumed.sparsity == 0.5
    assert module.student.stem[0].out_channels == 4
    assert module.student.stages[1][0].conv1.out_channels == 8


def test_with_the_distillation_module_adapters_follow(digits):
    from distill.module import DistillationModule

    student = build_model("resnet", 1, 10, widths=(8, 16), blocks=1)
    teacher = build_model("resnet", 1, 10, widths=(16, 32), blocks=1)
    cfg = {"kd": {"weight": 1.0},
           "feature": {"weight": 1.0, "pairs": [{"student": "stages.1", "teacher": "stages.1"}]}}
    module = DistillationModule(student, teacher, 10, X.clone(), distill=cfg)
    pruning = StructuredPruning("constant", target_sparsity=0.5, start_epoch=1)
    trainer = _trainer([pruning], limit_val_batches=1)
    trainer.fit(module, datamodule=digits)
    (adapter,) = module.adapters.values()
    assert (adapter.in_channels, adapter.out_channels) == (8, 32)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.parameters()} == opt_params
    assert torch.isfinite(trainer.callback_metrics["val/accuracy"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"importance": "l3"}, r"'importance' must be one of l1, l2, bn_scale, taylor; got 'l3'"),
        ({"granularity": "step"}, r"'granularity' must be one of epoch, batch; got 'step'"),
        ({"round_to": 0}, r"'round_to' must be a positive integer or None; got 0"),
        ({"ignore_layers": "fc"}, r"'ignore_layers' must be a list of layer names; got 'fc'"),
        ({"target_sparsity": 1.5}, r"'target_sparsity' must be in \[0, 1\); got 1.5"),
        ({"target_macs_reduction": 1.0}, r"'target_macs_reduction' must be in \[0, 1\)"),
        ({"schedule": "cubicc"}, r"unknown pruning schedule 'cubicc' \(did you mean 'cubic'"),
        ({"start_epoch": 4, "end_epoch": 2}, r"pruning 'end' \(2\) is before 'start' \(4\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        StructuredPruning(**kwargs)


def test_unknown_layer_name_lists_close_names():
    pruning = StructuredPruning(ignore_layers=["stages.0.0.conv"])
    with pytest.raises(UserError, match=r"^prune.ignore_layers: no layer named "
                                        r"'stages.0.0.conv' in the student; close: ") as err:
        pruning.setup(None, Tiny(), "fit")
    assert "stages.0.0.conv1" in str(err.value) and "stages.0.0.conv2" in str(err.value)


def test_from_config_takes_the_recipe_section_as_dict_or_dataclass():
    from distill.config import PruneConfig

    cfg = PruneConfig(method="structured", schedule="linear", target_sparsity=0.4,
                      importance="l2", global_pruning=True, round_to=4, ignore_layers=["stem"])
    for section in (cfg, dataclasses.asdict(cfg)):
        pruning = StructuredPruning.from_config(section)
        assert (pruning.importance, pruning.global_pruning, pruning.round_to) == ("l2", True, 4)
        assert pruning.ignore_layers == ["stem"] and pruning.schedule(3) == pytest.approx(0.4)


def test_due_only_when_a_channel_or_a_point_of_macs_goes():
    pruning = StructuredPruning("linear", target_sparsity=0.5)
    assert pruning.due(0.1) and not pruning.due(0.0)  # nothing applied yet
    pruning.sparsity, pruning.original_widths, pruning.widths = 0.25, {"a": 16}, {"a": 12}
    assert not pruning.due(0.25) and not pruning.due(0.2)
    assert pruning.due(0.26)  # floor(16 * 0.74) = 11 < 12
    macs = StructuredPruning("linear", target_macs_reduction=0.5, granularity="batch")
    macs.sparsity = 0.2
    assert not macs.due(0.205, final=False) and macs.due(0.205, final=True)
    assert macs.due(0.211, final=False)


def test_callback_pickles_for_ddp_spawn():
    pruning = StructuredPruning("cubic", end_epoch=4, ignore_layers=["stem"])
    clone = pickle.loads(pickle.dumps(pruning))
    assert clone.schedule(4) == 0.5 and clone.ignore_layers == ["stem"]


def test_pruning_after_the_student_became_a_graph_is_a_user_error():
    module = Tiny()
    module.student = torch.fx.symbolic_trace(module.student)
    with pytest.raises(UserError, match=r"due at epoch 2 but the student is already a quantized "
                                        r"graph: end pruning before QAT starts"):
        StructuredPruning("linear", end_epoch=3)._step(None, module, 2.0)
