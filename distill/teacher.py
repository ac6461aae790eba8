"""The teacher: loaded from a checkpoint, a state_dict or an ONNX file, or trained first.

A teacher trained by a recipe is saved under ``teacher.cache_dir`` with a key that covers
everything that shapes it (architecture, data, seed, epochs, learning rate), so the next run of
the same recipe reuses it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.errors import UserError
from distill.instantiate import build_model_from_cfg
from distill.io import atomic_path, load_torch_file

log = logging.getLogger(__name__)

_PREFIXES = ("student.", "model.", "teacher.", "net.", "module.")


class OnnxTeacher(nn.Module):
    """A teacher given as an ONNX file, run by ONNX Runtime (logit KD only, CPU)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"teacher ONNX '{path}' cannot be loaded: {first}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(np.float32)})
        return torch.from_numpy(out[0]).to(x.device)


def teacher_cache_key(recipe: dict[str, Any]) -> str:
    """A short hash of what determines a recipe-trained teacher."""
    t = recipe["teacher"]
    shape = {
        "teacher": {k: t.get(k) for k in ("name", "_target_", "kwargs", "train_epochs", "lr",
                                          "seed", "train_fraction")},
        # the student's share of the data does not shape the teacher
        "data": {k: v for k, v in recipe["data"].items()
                 if k not in ("num_workers", "train_fraction")},
        "v": 1,
    }
    blob = json.dumps(shape, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub and prefix in ("student.", "model."):
            return sub
    return state


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state_dict from a Lightning checkpoint or a plain ``torch.save``d state_dict.

    Loads with ``weights_only=True``: a checkpoint cannot run code when loaded.
    """
    obj = load_torch_file(path, what)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what} '{path}' holds no state_dict of tensors")
    return _strip_prefix(obj)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error on any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} with other shapes (e.g. '{k}': checkpoint "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise UserError(f"{what} '{path}' does not match the architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_or_train_teacher(
    recipe: dict[str, Any], datamodule: Any, in_channels: int, num_classes: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher of a recipe, and where it came from.

    Returns:
        ``(teacher, info)`` with ``info = {"source": "checkpoint"|"onnx"|"cache"|"trained",
        "path": ...}``.
    """
    cfg = recipe["teacher"]
    if cfg.get("checkpoint"):
        path = Path(cfg["checkpoint"]).expanduser()
        if not path.is_file():
            raise UserError(f"teacher.checkpoint not found: '{path}'")
        if path.suffix == ".onnx":
            return OnnxTeacher(path).eval(), {"source": "onnx", "path": str(path)}
        model = build_model_from_cfg(cfg, in_channels, num_classes, "teacher")
        load_into(model, read_state_dict(path, "teacher.checkpoint"), path, "teacher.checkpoint")
        return model.eval().requires_grad_(False), {"source": "checkpoint", "path": str(path)}

    cache = Path(cfg["cache_dir"]).expanduser() / f"teacher-{teacher_cache_key(recipe)}.pt"
    torch.manual_seed(cfg["seed"])  # the teacher's init depends on its own seed only
    model = build_model_from_cfg(cfg, in_channels, num_classes, "teacher")
    if cache.is_file():
        load_into(model, read_state_dict(cache, "cached teacher"), cache, "cached teacher")
        return model.eval().requires_grad_(False), {"source": "cache", "path": str(cache)}
    teacher_dm = datamodule
    if cfg.get("train_fraction", 1.0) != recipe["data"].get("train_fraction", 1.0):
        from distill.instantiate import build_datamodule

        data = {**recipe["data"], "train_fraction": cfg["train_fraction"]}
        teacher_dm = build_datamodule(data, recipe["seed"])
    train_teacher(model, recipe, teacher_dm, num_classes)
    try:
        with atomic_path(cache) as tmp:
            torch.save(model.state_dict(), tmp)
    except OSError as exc:
        raise UserError(f"teacher.cache_dir '{cache.parent}' is not writable: {exc}") from None
    return model.eval().requires_grad_(False), {"source": "trained", "path": str(cache)}


def train_teacher(model: nn.Module, recipe: dict[str, Any], datamodule: Any, num_classes: int
                  ) -> None:
    """Train the teacher on the recipe's data with cross-entropy only (no logger, no files)."""
    import pytorch_lightning as pl

    from distill.module import DistillationModule

    cfg = recipe["teacher"]
    pl.seed_everything(cfg["seed"], workers=True, verbose=False)
    example = next(iter(datamodule.val_dataloader()))[0][:1]
    module = DistillationModule(
        model, None, num_classes, example,
        distill={"task_weight": 1.0, "kd": {"weight": 0.0}},
        optim={**recipe["optim"], "lr": cfg["lr"]},
    )
    t = recipe["trainer"]
    trainer = pl.Trainer(
        max_epochs=cfg["train_epochs"],
        accelerator=t["accelerator"],
        devices=1,  # a teacher trains once, on one device, before the student's (DDP) run
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=t["enable_progress_bar"],
        num_sanity_val_steps=0,
    )
    log.info("training the teacher for %d epochs (cached for the next run)", cfg["train_epochs"])
    trainer.fit(module, datamodule=datamodule)
    model.cpu()
