"""UnstructuredPruning: magnitude and 2:4 masks during fit, made permanent, resumable."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from distill.callbacks.unstructured_pruning import (
    UnstructuredPruning,
    magnitude_masks,
    nm_mask,
)
from distill.errors import UserError
from distill.models import build_model


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = build_model("resnet", 1, 4, widths=(8, 16), blocks=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.student(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9)


def _fit(callbacks, max_epochs=3, module=None, ckpt=None, **kwargs) -> Tiny:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g)
    module = module or Tiny()
    args = dict(max_epochs=max_epochs, limit_train_batches=3, enable_progress_bar=False,
                logger=False, enable_checkpointing=False, enable_model_summary=False)
    pl.Trainer(callbacks=callbacks, **{**args, **kwargs}).fit(
        module, DataLoader(TensorDataset(x, y), batch_size=16), ckpt_path=ckpt
    )
    return module


def _conv_layers(module: Tiny) -> dict[str, nn.Module]:
    return {n: m for n, m in module.student.named_modules() if isinstance(m, nn.Conv2d)}


class ZeroSets(Callback):
    """The zero positions of every conv weight after each epoch's pruning step."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append({n: (m.weight_orig * m.weight_mask == 0) if hasattr(m, "weight_mask")
                            else m.weight == 0 for n, m in _conv_layers(pl_module).items()})

    def on_train_epoch_end(self, trainer, pl_module):
        copy.deepcopy(pl_module.student)  # what an export does: must work while masked


def test_layerwise_magnitude_masks_zero_the_smallest_share():
    torch.manual_seed(0)
    weights = {"a": torch.randn(8, 4, 3, 3), "b": torch.randn(10, 20)}
    masks = magnitude_masks(weights, 0.3)
    for name, w in weights.items():
        assert int((~masks[name]).sum()) == round(0.3 * w.numel())
        assert w.abs()[~masks[name]].max() <= w.abs()[masks[name]].min()


def test_global_magnitude_masks_use_one_threshold():
    torch.manual_seed(0)
    weights = {"small": torch.randn(100) * 0.01, "large": torch.randn(100)}
    masks = magnitude_masks(weights, 0.5, global_pruning=True)
    assert int(sum((~m).sum() for m in masks.values())) == 100
    pruned = torch.cat([w.abs()[~masks[n]] for n, w in weights.items()])
    kept = torch.cat([w.abs()[masks[n]] for n, w in weights.items()])
    assert pruned.max() <= kept.min()
    assert int((~masks["small"]).sum()) > 90  # the low-magnitude layer loses most


def test_two_four_mask_keeps_the_two_largest_of_every_four_input_weights():
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    mask = nm_mask(w, 0.5)
    groups = w.abs().movedim(1, -1).reshape(-1, 4)
    kept = mask.movedim(1, -1).reshape(-1, 4)
    assert (kept.sum(1) == 2).all()
    top2 = torch.zeros_like(kept).scatter_(1, groups.topk(2, dim=1).indices, True)
    assert torch.equal(kept, top2)
    # gradual: a quarter is half the candidates, never more than 2 zeros in a group of 4
    quarter = nm_mask(w, 0.25)
    assert int((~quarter).sum()) == w.numel() // 4
    assert ((~quarter).movedim(1, -1).reshape(-1, 4).sum(1) <= 2).all()
    linear = nm_mask(torch.randn(3, 8), 0.5)
    assert (linear.reshape(-1, 4).sum(1) == 2).all()


def test_magnitude_pruning_during_fit_is_gradual_and_made_permanent():
    zeros = ZeroSets()
    pruning = UnstructuredPruning("linear", 0.0, 0.6, start_epoch=0, end_epoch=2)
    module = _fit([pruning, zeros])
    report = pruning.report()
    assert set(report["layers"]) == set(_conv_layers(module))  # fc is the output layer
    for name, share in report["layers"].items():
        assert share == pytest.approx(0.6, abs=0.02), name
    assert report["global"] == pytest.approx(0.6, abs=0.01)
    assert [h["sparsity"] for h in pruning.history] == pytest.approx([0.3, 0.6])
    # masks never regrow: each epoch's zeros include the previous epoch's
    for before, after in zip(zeros.epochs, zeros.epochs[1:]):
        assert all((after[n] | ~before[n]).all() for n in before)
    # permanent: plain parameters with the zeros in them, no re-parametrisation left
    for layer in _conv_layers(module).values():
        assert not prune.is_pruned(layer) and isinstance(layer.weight, nn.Parameter)
        assert not hasattr(layer, "weight_orig") and not layer._forward_pre_hooks
    assert float((module.student.fc.weight == 0).float().mean()) == 0.0
    assert set(module.student.state_dict()) == set(Tiny().student.state_dict())


def test_two_four_pattern_in_fit_skips_layers_it_cannot_group():
    pruning = UnstructuredPruning("constant", target_sparsity=0.5, pattern="2:4", start_epoch=1)
    module = _fit([pruning, ZeroSets()], max_epochs=2)
    assert pruning.skipped == {"stem.0": "input width 1 is not a multiple of 4"}
    assert float((module.student.stem[0].weight == 0).float().mean()) == 0.0
    for name, layer in _conv_layers(module).items():
        if name != "stem.0":
            groups = (layer.weight != 0).movedim(1, -1).reshape(-1, 4)
            assert (groups.sum(1) == 2).all(), name
    assert pruning.report()["global"] == pytest.approx(0.5)


def test_checkpoints_hold_dense_weights_and_resume_restores_masks(tmp_path):
    schedule = dict(schedule="linear", target_sparsity=0.5, start_epoch=0, end_epoch=3)
    first = UnstructuredPruning(**schedule)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = _fit([first, ckpt], max_epochs=2, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert not any(k.endswith(("_orig", "_mask")) for k in saved["state_dict"])
    fresh = Tiny()
    fresh.load_state_dict(saved["state_dict"])  # strict, into a never-pruned build
    assert torch.equal(fresh.student.stages[0][0].conv1.weight,
                       module.student.stages[0][0].conv1.weight)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("UnstructuredPruning"))
    assert state["sparsity"] == pytest.approx(1 / 6) and set(state["masks"]) == set(
        _conv_layers(module))
    zeros = ZeroSets()
    resumed = UnstructuredPruning(**schedule)
    _fit([resumed, zeros], max_epochs=4, module=Tiny(), ckpt=str(tmp_path / "last.ckpt"))
    # at the start of epoch 2 the restored masks are in place, then the ramp continues
    for name, mask in state["masks"].items():
        assert (zeros.epochs[0][name] | mask).all()
    assert [h["sparsity"] for h in resumed.history] == pytest.approx([1 / 6, 1 / 3, 0.5])
    assert resumed.report()["global"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "4:8"}, r"'pattern' must be one of unstructured, 2:4; got '4:8'"),
        ({"pattern": "2:4", "target_sparsity": 0.7},
         r"'target_sparsity' must be <= 0.5 with pattern 2:4 .*; got 0.7"),
        ({"granularity": "step"}, r"'granularity' must be one of epoch, batch; got 'step'"),
        ({"target_sparsity": -0.1}, r"'target_sparsity' must be in \[0, 1\); got -0.1"),
        ({"schedule": "exp"}, r"unknown pruning schedule 'exp'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        UnstructuredPruning(**kwargs)


def test_unknown_ignored_layer_fails_at_setup():
    with pytest.raises(UserError, match=r"no layer named 'stem.9' in the student; close: stem"):
        UnstructuredPruning(ignore_layers=["stem.9"]).setup(None, Tiny(), "fit")


def test_from_config_takes_the_recipe_section_as_dict_or_dataclass():
    from distill.config import PruneConfig

    cfg = PruneConfig(method="unstructured", schedule="constant", target_sparsity=0.5,
                      pattern="2:4", start_epoch=2)
    for section in (cfg, dataclasses.asdict(cfg)):
        pruning = UnstructuredPruning.from_config(section)
        assert pruning.pattern == "2:4" and (pruning.schedule(1), pruning.schedule(2)) == (0, 0.5)


def test_callback_pickles_for_ddp_spawn():
    clone = pickle.loads(pickle.dumps(UnstructuredPruning("linear", end_epoch=2)))
    assert clone.schedule(1) == pytest.approx(0.25)


def test_pruning_after_the_student_was_replaced_is_a_user_error():
    module, pruning = Tiny(), UnstructuredPruning("linear", end_epoch=3)
    pruning.setup(None, module, "fit")
    module.student = build_model("resnet", 1, 4, widths=(8, 16), blocks=1)
    with pytest.raises(UserError, match=r"due at epoch 1 but the student was replaced \(QAT\?\)"):
        pruning._step(module, 1.0)
