"""Build models and data modules from recipe sections, accepting only the expected kinds.

A ``_target_`` names a class by import path (``mypkg.models.TinyNet``). Only a *class* that is
a subclass of the expected base (``nn.Module`` for models, ``LightningDataModule`` for data) is
called, so a recipe (or a recipe found inside a downloaded run directory or checkpoint) cannot
run an arbitrary callable such as ``os.system``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from torch import nn

from distill.errors import UserError


def import_class(target: str, expected: type, key: str) -> type:
    """Import ``target`` and check that it is a subclass of ``expected``.

    Raises:
        UserError: the path does not import, or names something that is not such a class.
    """
    if not isinstance(target, str) or "." not in target:
        raise UserError(f"{key}._target_ must be a dotted import path like 'pkg.mod.Class'; "
                        f"got '{target}'")
    module_name, _, attr = target.rpartition(".")
    cwd = os.getcwd()
    if cwd not in sys.path:  # a user's own module in the working directory, as Hydra does
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failed while importing
        raise UserError(f"{key}._target_ '{target}' does not import: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UserError(f"{key}._target_ '{target}': module '{module_name}' has no '{attr}'")
    if not inspect.isclass(obj) or not issubclass(obj, expected):
        raise UserError(
            f"{key}._target_ '{target}' is not a {expected.__module__}.{expected.__name__} "
            f"subclass"
        )
    return obj


def call_class(cls: type, kwargs: dict[str, Any], key: str) -> Any:
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except TypeError as exc:
        raise UserError(f"{key}: cannot build {cls.__name__}: {exc}") from None


def build_model_from_cfg(cfg: dict[str, Any], in_channels: int, num_classes: int, key: str
                         ) -> nn.Module:
    """A model from a ``student``/``teacher`` section: ``_target_`` class or registered name."""
    from distill.models import build_model

    kwargs = dict(cfg.get("kwargs") or {})
    if cfg.get("_target_"):
        cls = import_class(cfg["_target_"], nn.Module, key)
        params = inspect.signature(cls).parameters
        # Pass the data's shape to classes that ask for it, unless the recipe already does.
        if "in_channels" in params:
            kwargs.setdefault("in_channels", in_channels)
        if "num_classes" in params:
            kwargs.setdefault("num_classes", num_classes)
        return call_class(cls, kwargs, key)
    if not cfg.get("name"):
        raise UserError(f"{key} needs a 'name' (a registered model) or a '_target_' class")
    try:
        return build_model(cfg["name"], in_channels, num_classes, **kwargs)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None


def build_datamodule(cfg: dict[str, Any], seed: int) -> Any:
    """The data module of a ``data`` section: ``_target_`` class or a built-in by ``name``."""
    import pytorch_lightning as pl

    from distill.data import BUILTIN

    kwargs = dict(cfg.get("kwargs") or {})
    if cfg.get("_target_"):
        cls = import_class(cfg["_target_"], pl.LightningDataModule, "data")
        dm = call_class(cls, kwargs, "data")
    else:
        cls = BUILTIN[cfg["name"]]
        params = inspect.signature(cls).parameters
        common = {k: cfg[k] for k in ("batch_size", "num_workers", "image_size", "train_fraction",
                                      "val_fraction", "test_fraction", "split_seed", "root")
                  if k in params and cfg.get(k) is not None}
        dm = call_class(cls, {**common, "seed": seed, **kwargs}, "data")
    for attr in ("input_shape", "num_classes"):
        if not hasattr(dm, attr):
            raise UserError(f"data module {type(dm).__name__} must define '{attr}'")
    return dm
