"""Capture named intermediate outputs with forward hooks that are always removed."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from distill.errors import UserError


def resolve_layer(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """The sub-module called ``name`` (dotted path), or a ``UserError`` with the closest names."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UserError(f"{role} has no layer named '{name}'{hint}")


@contextlib.contextmanager
def capture_features(
    model: nn.Module, names: Sequence[str], role: str = "model"
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named layers during the block's forward passes.

    Example:
        >>> with capture_features(net, ["stages.1"]) as feats:
        ...     net(x)
        >>> feats["stages.1"].shape  # doctest: +SKIP

    The hooks are removed when the block exits, also on an exception, so a model is never
    left carrying hooks (which would break export and leak memory).
    """
    feats: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in dict.fromkeys(names):
            layer = resolve_layer(model, name, role)

            def hook(_m: nn.Module, _inp: object, out: torch.Tensor, _n: str = name) -> None:
                feats[_n] = out

            handles.append(layer.register_forward_hook(hook))
        yield feats
    finally:
        for h in handles:
            h.remove()
