"""Make a freshly built network match the layer widths stored in a (pruned) checkpoint.

Structured pruning physically removes channels, so a pruned checkpoint no longer fits the
architecture its recipe builds: ``load_state_dict`` fails on every shrunk tensor.
``reshape_to_state_dict`` walks the module's ``Conv*d``, ``Linear`` and ``BatchNorm*d`` layers,
and where the checkpoint holds a different shape it replaces the parameters and buffers by empty
tensors of the stored shape and fixes the layer's width attributes (``in_channels``,
``out_channels``, ``groups``, ``num_features``, ``in_features``, ``out_features``). The values
come from the ``load_state_dict`` call that follows.

Example:
    >>> model = build_model("resnet_student", 1, 10)
    >>> reshape_to_state_dict(model, pruned_state_dict)
    >>> model.load_state_dict(pruned_state_dict)  # strict
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
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
