"""``DistillationModule``: a frozen teacher distilled into a student, on Lightning.

The loss is ``task_weight · CE(student, y) + Σ weight_i · term_i`` with the terms of
``distill.losses`` (``kd``, ``feature``, ``attention``, ``dkd``); each is logged.

Contract callbacks rely on (pruning, QAT, export):
- ``student`` is a registered sub-module and may be *replaced* (a pruned or QAT-prepared
  module); ``training_step`` always calls ``self.student``.
- ``teacher`` is frozen and *not* a registered sub-module: it stays out of the optimizer, the
  checkpoint and the DDP wrapper. It is moved to the module's device at fit start.
- ``adapters`` (FitNets 1x1 convs / linears) map student features to teacher widths;
  ``rebuild_adapters()`` re-creates those whose width no longer matches.
- ``feature_hooks_enabled`` turns feature/attention terms off (a QAT-converted student is an
  exported graph without layer names).
- ``exporter``: ``None`` or a callable ``(student, path, example_input) -> dict`` that
  ``ExportAndMeasure`` uses instead of the FP32 ONNX export.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from distill.features import capture_features, resolve_layer
from distill.losses import attention_loss, dkd_loss, feature_loss, kd_loss


def _adapter_key(student_layer: str, teacher_layer: str) -> str:
    return f"{student_layer}__to__{teacher_layer}".replace(".", "_")


class DistillationModule(pl.LightningModule):
    """Teacher→student distillation as a LightningModule.

    Args:
        student: The model being trained (and later pruned / quantized / exported).
        teacher: A trained model, frozen here; ``None`` trains the student from scratch.
        num_classes: Number of classes (accuracy metrics).
        example_input: One input sample, shape ``(1, C, H, W)`` (export, adapter shapes).
        distill: The recipe's ``distill`` section as a plain dict.
        optim: The recipe's ``optim`` section as a plain dict.
        recipe: The resolved recipe (saved in checkpoints so ``distill export`` can rebuild).

    Example:
        >>> module = DistillationModule(student, teacher, 10, torch.zeros(1, 1, 32, 32),
        ...                             distill={"kd": {"weight": 1.0, "temperature": 4.0}})
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        num_classes: int,
        example_input: torch.Tensor,
        distill: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "example_input"])
        self.student = student
        self._teacher: list[nn.Module] = []  # a list keeps it out of the module tree
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self._teacher.append(teacher)
        self.num_classes = num_classes
        self.example_input = example_input.detach().cpu().float()
        self.cfg = _with_defaults(distill or {})
        self.optim_cfg = {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "momentum": 0.9,
                          "scheduler": "cosine", **(optim or {})}
        self.feature_hooks_enabled = True
        self.exporter: Callable[[nn.Module, Path, torch.Tensor], dict] | None = None
        self.adapters = nn.ModuleDict()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        # this epoch's batch-weighted sums of the training loss terms, logged at its end
        self._train_sums: dict[str, torch.Tensor] = {}
        self._train_count = 0
        if self.teacher is None and self._uses_teacher():
            raise ValueError("distillation terms have weight > 0 but no teacher was given")
        self._validate_layers()
        self.rebuild_adapters()
        self.teacher_cache = None
        if self.cfg["cache_teacher"]:
            if self._pairs("feature") or self._pairs("attention"):
                raise ValueError("distill.cache_teacher caches logits only: it cannot be used "
                                 "with feature or attention terms")
            from distill.teacher_cache import TeacherCache

            self.teacher_cache = TeacherCache()

    # ----- teacher ---------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def _uses_teacher(self) -> bool:
        c = self.cfg
        return any(c[k]["weight"] > 0 for k in ("kd", "feature", "attention", "dkd"))

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    on_validation_start = on_fit_start
    on_test_start = on_fit_start

    # ----- features --------------------------------------------------------------------------
    def _pairs(self, term: str) -> list[tuple[str, str]]:
        if self.cfg[term]["weight"] <= 0:
            return []
        return [(p["student"], p["teacher"]) for p in self.cfg[term]["pairs"]]

    def _validate_layers(self) -> None:
        for term in ("feature", "attention"):
            if self.cfg[term]["weight"] > 0 and not self.cfg[term]["pairs"]:
                raise ValueError(f"distill.{term}.weight > 0 needs distill.{term}.pairs")
            for s, t in self._pairs(term):
                resolve_layer(self.student, s, "student")
                resolve_layer(self.teacher, t, "teacher")

    @torch.no_grad()
    def _probe_features(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        pairs = self._pairs("feature")
        s_names, t_names = [p[0] for p in pairs], [p[1] for p in pairs]
        was_training = self.student.training
        self.student.eval()
        x = self.example_input.to(self.device)
        try:
            with capture_features(self.student, s_names, "student") as fs:
                self.student(x)
            with capture_features(self.teacher, t_names, "teacher") as ft:
                self.teacher.to(self.device)(x)
        finally:
            self.student.train(was_training)
        return fs, ft

    def rebuild_adapters(self) -> None:
        """(Re-)create FitNets adapters whose widths do not match the current student.

        Called at construction and after a pruning step changes the student's widths; an
        adapter that still matches is kept (with its learned weights).
        """
        pairs = self._pairs("feature")
        if not pairs or not self.feature_hooks_enabled:
            return
        fs, ft = self._probe_features()
        for s, t in pairs:
            key = _adapter_key(s, t)
            cs, ct = fs[s].shape[1], ft[t].shape[1]
            old = self.adapters[key] if key in self.adapters else None
            if cs == ct:
                if old is not None:
                    del self.adapters[key]
                continue
            if old is not None and _in_width(old) == cs and _out_width(old) == ct:
                continue
            layer = nn.Conv2d(cs, ct, 1, bias=False) if fs[s].dim() == 4 else nn.Linear(cs, ct)
            self.adapters[key] = layer.to(self.device)

    def _adapt(self, s: str, t: str, feat: torch.Tensor) -> torch.Tensor:
        key = _adapter_key(s, t)
        return self.adapters[key](feat) if key in self.adapters else feat

    # ----- steps -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        c = self.cfg
        feat_pairs = self._pairs("feature") if self.feature_hooks_enabled else []
        att_pairs = self._pairs("attention") if self.feature_hooks_enabled else []
        s_names = [p[0] for p in feat_pairs + att_pairs]
        t_names = [p[1] for p in feat_pairs + att_pairs]
        with capture_features(self.student, s_names, "student") as fs:
            logits = self.student(x)
        terms: dict[str, torch.Tensor] = {"task": F.cross_entropy(logits, y)}
        total = c["task_weight"] * terms["task"]
        if self.teacher is not None and self._uses_teacher():
            if self.teacher_cache is not None:
                t_logits, ft = self.teacher_cache.logits(x, self.teacher), {}
            else:
                with torch.no_grad(), capture_features(self.teacher, t_names, "teacher") as ft:
                    t_logits = self.teacher(x)
            if c["kd"]["weight"] > 0:
                terms["kd"] = kd_loss(logits, t_logits, c["kd"]["temperature"])
                total = total + c["kd"]["weight"] * terms["kd"]
            if c["dkd"]["weight"] > 0:
                d = c["dkd"]
                terms["dkd"] = dkd_loss(logits, t_logits, y, d["alpha"], d["beta"],
                                        d["temperature"])
                total = total + d["weight"] * terms["dkd"]
            if feat_pairs:
                terms["feature"] = sum(
                    feature_loss(self._adapt(s, t, fs[s]), ft[t]) for s, t in feat_pairs
                ) / len(feat_pairs)
                total = total + c["feature"]["weight"] * terms["feature"]
            if att_pairs:
                terms["attention"] = sum(
                    attention_loss(fs[s], ft[t]) for s, t in att_pairs
                ) / len(att_pairs)
                total = total + c["attention"]["weight"] * terms["attention"]
        return total, terms, logits

    def on_train_epoch_start(self) -> None:
        self._train_sums, self._train_count = {}, 0  # nothing left from an interrupted epoch
        self.train_acc.reset()

    def _log_this_step(self) -> bool:
        """Whether anything will read a per-step value: a progress bar, or a logger write."""
        trainer = self.trainer
        if trainer.progress_bar_callback is not None:
            return True
        connector = getattr(trainer, "_logger_connector", None)
        return bool(trainer.loggers) and bool(getattr(connector, "should_update_logs", True))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        total, terms, logits = self._losses(x, y)
        bs = x.shape[0]
        self.train_acc.update(logits.detach(), y)
        # Epoch means accumulate as tensors here and are logged once, at the epoch's end: every
        # self.log call costs Lightning ~0.7 ms on the CPU (3.5 ms a step with four of them,
        # profiled on a tiny model), a few percent of a small model's step.
        for name, value in (("loss", total), *terms.items()):
            weighted = value.detach() * bs
            prev = self._train_sums.get(name)
            self._train_sums[name] = weighted if prev is None else prev + weighted
        self._train_count += bs
        if self._log_this_step():
            self.log("train/loss_step", total.detach(), prog_bar=True, on_step=True,
                     on_epoch=False, batch_size=bs)
        return total

    def on_train_epoch_end(self) -> None:
        if self._train_count:
            sync = self.trainer.world_size > 1
            for name, total in self._train_sums.items():
                self.log(f"train/{name}", total / self._train_count, on_epoch=True, sync_dist=sync,
                         prog_bar=name == "loss")
            self.log("train/accuracy", self.train_acc.compute(), on_epoch=True, sync_dist=sync)
        cache = self.teacher_cache
        if cache is None or cache.frozen:
            return
        try:
            n = len(self.trainer.train_dataloader.dataset) // max(1, self.trainer.world_size)
        except (AttributeError, TypeError):
            return
        # Once every training sample (of this rank's shard) is cached, a miss means the data
        # changed between epochs: random augmentation, which caching would silently break.
        cache.frozen = len(cache) >= n

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.student(x)
        self.val_acc(logits, y)
        bs = x.shape[0]
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=bs)
        self.log("val/accuracy", self.val_acc, on_epoch=True, prog_bar=True, batch_size=bs)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self.student(x), y)
        self.log("test/accuracy", self.test_acc, on_epoch=True, batch_size=x.shape[0])

    # ----- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        o = self.optim_cfg
        params = list(self.student.parameters()) + list(self.adapters.parameters())
        params = [p for p in params if p.requires_grad]
        name = o["name"]
        if name == "sgd":
            opt = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"],
                                  weight_decay=o["weight_decay"])
        elif name == "adam":
            opt = torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
        elif name == "adamw":
            opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        else:
            raise ValueError(f"optim.name must be one of adamw, adam, sgd; got '{name}'")
        if o["scheduler"] == "none" or self._trainer is None:
            return opt
        epochs = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ----- checkpoints -----------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reshape a freshly built student to a pruned checkpoint before its weights load."""
        from distill.arch import reshape_to_state_dict

        reshape_to_state_dict(self, checkpoint["state_dict"])


def _in_width(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def _out_width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill a (possibly partial) ``distill`` section with the schema's defaults."""
    base = {
        "task_weight": 1.0,
        "kd": {"weight": 0.0, "temperature": 4.0},
        "feature": {"weight": 0.0, "pairs": []},
        "attention": {"weight": 0.0, "pairs": []},
        "dkd": {"weight": 0.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0},
        "cache_teacher": False,
    }
    out = dict(base)
    for key, value in cfg.items():
        out[key] = {**base[key], **value} if isinstance(base.get(key), dict) else value
    return out
