"""Architecture surgery on plain ``nn.Module``s: remove channels, follow a pruned checkpoint.

Channel pruning (Torch-Pruning's dependency graph, Fang et al. 2023, arXiv:2301.12900) is
split into a *decision* and its *effect*, so that DDP rank 0 can decide and broadcast:
``score_channels`` (importance per prunable group) → ``select_channels`` (a plan of plain
values: which output channels of which root layer go) → ``apply_plan`` (removes them with every
coupled layer, in place, and reports which elements of each parameter survived, so optimizer
state can follow).

``reshape_to_state_dict``: a pruned checkpoint no longer fits the architecture its recipe
builds (``load_state_dict`` fails on every shrunk tensor). It walks the module's ``Conv*d``,
``Linear`` and ``BatchNorm*d`` layers, and where the checkpoint holds a different shape it
replaces the parameters and buffers by zero tensors of the stored shape and fixes the width
attributes (``in_channels``, ``out_channels``, ``groups``, ``num_features``, ``in_features``,
``out_features``). The values come from the ``load_state_dict`` call that follows.

Example:
    >>> model = build_model("resnet_student", 1, 10)
    >>> reshape_to_state_dict(model, pruned_state_dict)
    >>> model.load_state_dict(pruned_state_dict)  # strict
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from distill.errors import UserError

_RESHAPABLE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def _stored(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor | None:
    value = state_dict.get(key)
    return value if isinstance(value, torch.Tensor) else None


def _new_tensor(old: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.zeros(shape, dtype=old.dtype, device=old.device)


def _replace(module: nn.Module, attr: str, shape: torch.Size) -> None:
    """Give ``module.attr`` (a parameter or a buffer) a new, zero-filled tensor of ``shape``."""
    old = getattr(module, attr)
    if old is None or old.shape == shape:
        return
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(_new_tensor(old, shape), old.requires_grad))
    else:
        module.register_buffer(attr, _new_tensor(old, shape))


def _reshape_conv(conv: nn.modules.conv._ConvNd, weight_shape: torch.Size) -> None:
    # Depthwise convolutions (one input channel per group) lose groups with their channels;
    # other grouped convolutions keep the group count (Torch-Pruning prunes inside each group).
    per_group_out = conv.out_channels // conv.groups
    depthwise = conv.groups > 1 and conv.in_channels == conv.groups
    dim_out, dim_in = (1, 0) if conv.transposed else (0, 1)
    if conv.transposed:
        out_channels = weight_shape[dim_out] * conv.groups
        groups = conv.groups
        in_channels = weight_shape[dim_in]
    else:
        out_channels = weight_shape[dim_out]
        groups = max(out_channels // per_group_out, 1) if depthwise else conv.groups
        in_channels = weight_shape[dim_in] * groups
    conv.out_channels, conv.in_channels, conv.groups = out_channels, in_channels, groups
    _replace(conv, "weight", weight_shape)
    if conv.bias is not None:
        _replace(conv, "bias", torch.Size([out_channels]))


def _reshape_layer(layer: nn.Module, weight_shape: torch.Size) -> None:
    if isinstance(layer, nn.modules.conv._ConvNd):
        _reshape_conv(layer, weight_shape)
    elif isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = int(weight_shape[0]), int(weight_shape[1])
        _replace(layer, "weight", weight_shape)
        if layer.bias is not None:
            _replace(layer, "bias", torch.Size([weight_shape[0]]))
    else:  # batch norm
        width = int(weight_shape[0])
        layer.num_features = width
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(layer, attr, None) is not None:
                _replace(layer, attr, torch.Size([width]))


def _reference_shape(layer: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str):
    """The stored shape that decides this layer's widths (weight, or running stats for BN)."""
    weight = _stored(state_dict, prefix + "weight")
    if weight is not None:
        return weight.shape
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        mean = _stored(state_dict, prefix + "running_mean")
        return None if mean is None else mean.shape
    return None


def _check_other_layers(module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str):
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        stored = _stored(state_dict, prefix + name)
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        if stored is None or stored.shape == tensor.shape or isinstance(owner, _RESHAPABLE):
            continue
        raise UserError(
            f"checkpoint tensor '{prefix + name}' has shape {tuple(stored.shape)} but the model's "
            f"is {tuple(tensor.shape)}, and a {type(owner).__name__} cannot be reshaped "
            "(only Conv, Linear and BatchNorm layers follow a pruned checkpoint)"
        )


def reshape_to_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = ""
) -> list[str]:
    """Reshape ``module``'s Conv/Linear/BatchNorm layers to the shapes stored in ``state_dict``.

    Args:
        module: A freshly built network, or a whole LightningModule (then the keys carry the
            submodule path, e.g. ``student.stem.0.weight``).
        state_dict: The checkpoint's tensors (a Lightning checkpoint's ``["state_dict"]``).
        prefix: Prepended to ``module``'s own names to find its keys, e.g. ``"student."`` when
            ``module`` is the student and ``state_dict`` the whole LightningModule's.

    Returns:
        Names of the layers whose shapes changed (empty when the checkpoint was not pruned).

    Raises:
        UserError: a shape differs on a layer type that cannot be reshaped.
    """
    changed = []
    for name, layer in module.named_modules():
        if not isinstance(layer, _RESHAPABLE):
            continue
        key = prefix + (f"{name}." if name else "")
        shape = _reference_shape(layer, state_dict, key)
        current = _reference_shape(layer, layer.state_dict(), "")
        if shape is None or current is None or shape == current:
            continue
        if len(shape) != len(current):
            raise UserError(
                f"checkpoint tensor '{key}weight' has {len(shape)} dimensions, the model's "
                f"{type(layer).__name__} '{name}' has {len(current)}: not the same architecture"
            )
        _reshape_layer(layer, shape)
        changed.append(name)
    _check_other_layers(module, state_dict, prefix)
    return changed


# ----- channel pruning with Torch-Pruning ---------------------------------------------------
# A plan is a list of ``(root layer name, output-channel indices to remove)``: plain values, so
# rank 0 can decide and broadcast it, and the same plan can be applied to a model or a copy.
Plan = list[tuple[str, list[int]]]

#: Channel importance criteria (Torch-Pruning 1.6): group L1/L2 magnitude, BN scale (Network
#: Slimming, Liu et al. 2017), first-order Taylor (Molchanov et al. 2019; needs gradients).
IMPORTANCES: dict[str, Callable[[], Any]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.TaylorImportance(),
}
_ROOT_TYPES = [nn.modules.conv._ConvNd, nn.Linear]


def output_layer_name(model: nn.Module) -> str | None:
    """The classifier that must keep its outputs: ``fc`` if present, else the last Linear."""
    if isinstance(getattr(model, "fc", None), nn.Module):
        return "fc"
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def resolve_layer_names(model: nn.Module, names: Iterable[str], what: str) -> list[str]:
    """Check that every name is a sub-module of ``model``; ``UserError`` lists close names."""
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise UserError(f"{what}: no layer named '{name}' in the student{hint}")
    return list(names)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (tracing must not move batch-norm statistics), then each module's own mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def trace(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` (one forward pass in eval mode)."""
    with torch.enable_grad(), _eval_mode(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)


def _grouped(group: Any) -> bool:
    """Groups with grouped (not depthwise) convolutions are left alone (channel blocks)."""
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
            if not m.groups == m.in_channels == m.out_channels:
                return True
    return False


def _taylor_gradients(model: nn.Module, batch: Any) -> None:
    if batch is None:
        raise UserError("taylor importance needs a training batch (no datamodule to draw from)")
    x, y = batch[0], batch[1]
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()


def score_channels(
    model: nn.Module,
    example_input: torch.Tensor,
    importance: str,
    ignore: Iterable[str] = (),
    batch: Any = None,
) -> dict[str, torch.Tensor]:
    """Per-channel importance of every prunable group, keyed by the group's root layer name.

    Args:
        model: Scored as is; with ``taylor`` its gradients are overwritten (pass a copy).
        example_input: Input for tracing, shape ``(1, C, H, W)``.
        importance: A key of ``IMPORTANCES``.
        ignore: Layers (and their sub-modules) whose output channels are kept.
        batch: ``(x, y)`` for ``taylor``: the gradients of the cross-entropy on it.
    """
    graph = trace(model, example_input)
    if importance == "taylor":
        _taylor_gradients(model, batch)
    scorer = IMPORTANCES[importance]()
    ignored = [m for name in ignore for m in model.get_submodule(name).modules()]
    names = {m: n for n, m in model.named_modules()}
    scores = {}
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=_ROOT_TYPES):
        if _grouped(group):
            continue
        imp = scorer(group)
        if imp is not None:
            scores[names[group[0].dep.target.module]] = imp.detach().float().cpu()
    return scores


def kept_channels(original: int, sparsity: float, round_to: int | None = None) -> int:
    """Channels a layer of ``original`` width keeps at ``sparsity``: ``floor(n (1 - s))``,
    rounded down to a multiple of ``round_to``, at least one (or ``round_to``)."""
    keep = math.floor(original * (1.0 - sparsity) + 1e-6)
    if round_to:
        keep -= keep % round_to
    return max(keep, round_to or 1)


def select_channels(
    scores: Mapping[str, torch.Tensor],
    original: Mapping[str, int],
    sparsity: float,
    global_pruning: bool = False,
    round_to: int | None = None,
) -> Plan:
    """Decide which channels go so that the network reaches ``sparsity`` of its original widths.

    Per layer (default): each group keeps ``kept_channels(original, sparsity)`` channels, its
    least important ones removed. Global: one threshold over all normalised scores, so the total
    reaches the target and redundant layers lose more (Torch-Pruning's ``global_pruning``); every
    layer keeps at least one channel (or ``round_to``).
    """
    plan: Plan = []
    floor = round_to or 1
    if global_pruning:
        # Each layer's `floor` best channels are out of the ranking: no layer is emptied, and
        # the others make up the difference so the total still reaches the target.
        ranked = {n: _protect_top(s, floor) for n, s in scores.items()}
        total_orig = sum(original.get(n, len(s)) for n, s in scores.items())
        n_prune = sum(len(s) for s in scores.values()) - kept_channels(total_orig, sparsity)
        candidates = torch.cat(list(ranked.values()))
        n_prune = min(n_prune, int(torch.isfinite(candidates).sum()))
        if n_prune <= 0:
            return plan
        threshold = candidates.kthvalue(n_prune).values
    for name, imp in scores.items():
        current = len(imp)
        if global_pruning:
            keep = current - int((ranked[name] <= threshold).sum())
            if keep < current and round_to:
                keep -= keep % round_to
            keep = max(keep, floor)
        else:
            keep = kept_channels(original.get(name, current), sparsity, round_to)
        if keep < current:
            plan.append((name, sorted(torch.argsort(imp)[: current - keep].tolist())))
    return plan


def _protect_top(imp: torch.Tensor, k: int) -> torch.Tensor:
    out = imp.clone()
    out[torch.topk(imp, min(k, len(imp))).indices] = float("inf")
    return out


def _shadow(module: nn.Module) -> nn.Module:
    """A shallow copy whose parameters hold their own flat indices (float64: exact)."""
    shadow = copy.copy(module)
    shadow._parameters = {
        name: None if p is None else nn.Parameter(
            torch.arange(p.numel(), dtype=torch.float64).view(p.shape), requires_grad=False
        )
        for name, p in module._parameters.items()
    }
    shadow._buffers = dict(module._buffers)
    shadow._modules = dict(module._modules)
    return shadow


def apply_plan(
    model: nn.Module, example_input: torch.Tensor, plan: Plan
) -> dict[str, torch.Tensor]:
    """Remove the planned channels from ``model`` in place (with all coupled layers).

    Returns:
        For every parameter that changed shape, the flat indices (into the parameter before the
        prune) of the values it kept, shaped like the new parameter: optimizer state follows
        with ``old_state.flatten()[index]``. Found by replaying each pruning step on index-valued
        shadows of the layers, so it holds for any layer Torch-Pruning can prune.
    """
    if not plan:
        return {}
    graph = trace(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    shadows: dict[nn.Module, nn.Module] = {}
    for root_name, idxs in plan:
        root = model.get_submodule(root_name)
        prune_out = graph.get_pruner_of_module(root).prune_out_channels
        group = graph.get_pruning_group(root, prune_out, idxs)
        if not graph.check_pruning_group(group):
            continue  # would empty a layer
        for dep, dep_idxs in group:
            target = dep.target.module
            if not isinstance(target, nn.Module) or target not in names:
                continue  # an operator node, or a bare nn.Parameter (its state restarts)
            if next(target.parameters(recurse=False), None) is None:
                continue
            shadow = shadows.setdefault(target, _shadow(target))
            dep.handler.__self__.pruning_dim = dep.target.pruning_dim
            dep.handler(shadow, [int(getattr(i, "idx", i)) for i in dep_idxs])
        group.prune()
    index: dict[str, torch.Tensor] = {}
    for module, shadow in shadows.items():
        prefix = f"{names[module]}." if names[module] else ""
        for pname, p in shadow._parameters.items():
            if p is not None:
                index[prefix + pname] = p.detach().long()
    return index


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """MACs and parameters of one forward pass (Torch-Pruning's counter, on a copy)."""
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int | None:
    """MACs of one forward pass in eval mode, or ``None`` where they cannot be counted.

    Optional by design: an exported graph module (a QAT-prepared student) or an unusual layer
    must not fail a report or an epoch row. Every submodule's own train/eval mode is restored.
    """
    from distill.export.onnx import eval_mode

    try:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        with eval_mode(model), torch.no_grad():
            return count_macs_params(model, example_input.to(device))[0]
    except Exception:
        return None


def fold_prune_masks(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace ``torch.nn.utils.prune``'s ``X_orig`` / ``X_mask`` pairs by plain ``X = orig *
    mask``, so a checkpoint saved mid-pruning loads into a freshly built model."""
    out = dict(state_dict)
    for key in [k for k in out if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        if base + "_mask" in out:
            out[base] = out.pop(key) * out.pop(base + "_mask")
    return out
