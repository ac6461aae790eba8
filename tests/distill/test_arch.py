"""Architecture surgery: a pruned checkpoint loads into a freshly built network."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from distill.arch import (
    apply_plan,
    count_macs_params,
    fold_prune_masks,
    reshape_to_state_dict,
    score_channels,
    select_channels,
)
from distill.errors import UserError
from distill.models import build_model

X = torch.randn(3, 1, 32, 32)


def _pruned_student(sparsity: float = 0.5, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet_student", 1, 10)
    scores = score_channels(model, X[:1], "l1", ["fc"])
    apply_plan(model, X[:1], select_channels(scores, {}, sparsity, **kwargs))
    # non-trivial batch-norm statistics, so a wrong buffer would show in the outputs
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 32, 32))
    return model.eval()


def test_pruned_state_dict_loads_strict_into_a_fresh_build():
    pruned = _pruned_student()
    state = pruned.state_dict()
    fresh = build_model("resnet_student", 1, 10)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(state)
    changed = reshape_to_state_dict(fresh, state)
    assert "stem.0" in changed and "fc" in changed and "stem.1" in changed
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    full = build_model("resnet_student", 1, 10)  # half of every width survives
    half_stem, half_last = full.stem[0].out_channels // 2, full.fc.in_features // 2
    assert fresh.stem[0].out_channels == half_stem and fresh.stem[1].num_features == half_stem
    assert (fresh.fc.in_features, fresh.fc.out_features) == (half_last, 10)
    assert torch.equal(fresh(X), pruned(X))
    assert count_macs_params(fresh, X[:1]) == count_macs_params(pruned, X[:1])


def test_whole_module_with_prefix_and_global_pruning():
    pruned = _pruned_student(0.4, global_pruning=True)
    state = {f"student.{k}": v for k, v in pruned.state_dict().items()}
    wrapper = nn.Module()
    wrapper.student = build_model("resnet_student", 1, 10)
    reshape_to_state_dict(wrapper, state)
    wrapper.load_state_dict(state)
    assert torch.equal(wrapper.student.eval()(X), pruned(X))
    # the same tensors addressed with an explicit prefix
    alone = build_model("resnet_student", 1, 10)
    reshape_to_state_dict(alone, state, prefix="student.")
    alone.load_state_dict(pruned.state_dict())


def test_unpruned_checkpoint_changes_nothing():
    model = build_model("resnet_student", 1, 10)
    assert reshape_to_state_dict(model, build_model("resnet_student", 1, 10).state_dict()) == []


def test_depthwise_convolution_follows_its_channels():
    net = nn.Sequential(nn.Conv2d(2, 8, 1), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                        nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    state = {
        "0.weight": torch.randn(6, 2, 1, 1), "0.bias": torch.randn(6),
        "1.weight": torch.randn(6, 1, 3, 3), "1.bias": torch.randn(6),
        "2.weight": torch.randn(6), "2.bias": torch.randn(6), "2.running_mean": torch.randn(6),
        "2.running_var": torch.rand(6), "2.num_batches_tracked": torch.tensor(3),
        "3.weight": torch.randn(4, 6, 1, 1), "3.bias": torch.randn(4),
    }
    reshape_to_state_dict(net, state)
    net.load_state_dict(state)
    assert (net[1].in_channels, net[1].out_channels, net[1].groups) == (6, 6, 6)
    assert net(torch.randn(1, 2, 5, 5)).shape == (1, 4, 5, 5)


def test_shape_mismatch_on_other_layers_is_a_user_error():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    state = {"0.weight": torch.randn(5, 4), "0.bias": torch.randn(5),
             "1.weight": torch.randn(5), "1.bias": torch.randn(5)}
    with pytest.raises(UserError, match=r"checkpoint tensor '1.weight' has shape \(5,\) but the "
                                        r"model's is \(6,\), and a LayerNorm cannot be reshaped"):
        reshape_to_state_dict(net, state)


def test_fold_prune_masks_gives_plain_weights():
    layer = nn.Linear(4, 3)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    folded = fold_prune_masks(layer.state_dict())
    assert set(folded) == {"weight", "bias"}
    assert torch.equal(folded["weight"], layer.weight) and int((folded["weight"] == 0).sum()) == 6
    fresh = nn.Linear(4, 3)
    fresh.load_state_dict(folded)
