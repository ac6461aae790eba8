"""``UnstructuredPruning``: zero individual weights of the student on a sparsity schedule.

**This does not make dense CPU inference faster.** The zeros stay in dense tensors: ONNX
Runtime's CPU kernels multiply them like any other value, so latency and model size (before
compression) are those of the unpruned model; ``scripts/bench_pruning.py`` measures it side by
side with channel pruning. Use it for sparse back ends (2:4 on NVIDIA Ampere+ sparse tensor
cores, sparse kernels) or as a study; for CPU speed use ``StructuredPruning``.

Masks follow ``torch.nn.utils.prune``: the weight is re-parametrised as ``weight_orig *
weight_mask`` during training (the same ``nn.Parameter`` object, so the optimizer keeps
working), and made permanent with ``prune.remove`` when fitting ends. Criteria, all on weight
magnitude |w| (Han et al. 2015):

- layer-wise: each Conv/Linear weight loses its own smallest ``s`` share;
- global: one threshold over all pruned weights (redundant layers lose more);
- ``2:4`` semi-structured (NVIDIA ASP, Mishra et al. 2021, arXiv:2104.08378): in every group
  of 4 consecutive input weights (input channels for convolutions) the 2 smallest are
  candidates; the schedule prunes the smallest share ``s / 0.5`` of the candidates, so at
  ``s = 0.5`` exactly 2 of every 4 are zero. Layers whose input width is not a multiple of 4
  are skipped (listed in ``report()``).

Masks never regrow (a new mask is ANDed with the old one). Checkpoints store plain dense
``weight`` tensors (masked values zero) and the masks in this callback's state, so a resumed
run loads into a freshly built model and re-applies the masks (Lightning skips callbacks'
``on_save_checkpoint`` for ``weights_only`` checkpoints: fold those with
``distill.arch.fold_prune_masks``). Under DDP every rank computes
the same masks from the same (synchronised) weights: magnitude ranking is deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.nn.utils import prune

from distill.arch import fold_prune_masks, output_layer_name, resolve_layer_names
from distill.errors import UserError

from .schedules import batch_step, check_granularity, check_layer_list, make_schedule

PATTERNS = ("unstructured", "2:4")


def magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float, global_pruning: bool = False
) -> dict[str, torch.Tensor]:
    """Keep-masks (bool) zeroing the ``sparsity`` share of smallest-|w| weights.

    Per layer, or over all layers at once with ``global_pruning``.
    """
    if global_pruning:
        flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
        keep = _smallest_out(flat, round(sparsity * flat.numel()))
        masks, start = {}, 0
        for name, w in weights.items():
            masks[name] = keep[start:start + w.numel()].view(w.shape)
            start += w.numel()
        return masks
    return {name: _smallest_out(w.detach().abs().reshape(-1), round(sparsity * w.numel()))
            .view(w.shape) for name, w in weights.items()}


def _smallest_out(values: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones_like(values, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(values, k, largest=False).indices] = False
    return keep


def _to_groups(w: torch.Tensor) -> torch.Tensor:
    """Rows of 4 consecutive input weights: (out, in) or (out, in, *k) -> (-1, 4)."""
    if w.dim() > 2:  # convolution: group along input channels, as NVIDIA ASP does
        w = w.movedim(1, -1)
    return w.reshape(-1, 4)


def _from_groups(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) > 2:
        moved = (shape[0], *shape[2:], shape[1])
        return groups.reshape(moved).movedim(-1, 1)
    return groups.reshape(shape)


def nm_mask(weight: torch.Tensor, sparsity: float, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask for gradual N:M sparsity (2:4 by default) reaching exact N:M at ``n/m``.

    In each group of ``m`` consecutive input weights the ``m - n`` smallest are candidates;
    the smallest ``sparsity / (1 - n/m)`` share of all candidates is zeroed.
    """
    if m != 4 or n != 2:
        raise ValueError("only 2:4 is implemented")
    groups = _to_groups(weight.detach().abs())
    candidates = torch.zeros_like(groups, dtype=torch.bool)
    candidates.scatter_(1, torch.argsort(groups, dim=1)[:, : m - n], True)
    share = min(sparsity / (1.0 - n / m), 1.0)
    k = round(share * int(candidates.sum()))
    keep = torch.ones_like(groups, dtype=torch.bool)
    if k > 0:
        scores = torch.where(candidates, groups, torch.full_like(groups, float("inf")))
        keep.view(-1)[torch.topk(scores.view(-1), k, largest=False).indices] = False
    return _from_groups(keep, weight.shape)


def _in_width(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels // layer.groups


class UnstructuredPruning(Callback):
    """Magnitude pruning of individual weights with ``torch.nn.utils.prune`` masks.

    Args:
        schedule: ``constant``, ``linear``, ``cubic``, ``exponential`` or ``epoch -> sparsity``.
        initial_sparsity: Sparsity at ``start_epoch``.
        target_sparsity: Share of weights zeroed at ``end_epoch`` (at most 0.5 for ``2:4``).
        start_epoch: First epoch that prunes.
        end_epoch: Epoch at which the target is reached; later epochs fine-tune.
        global_pruning: One magnitude threshold over all layers (``unstructured`` only).
        pattern: ``unstructured`` or ``2:4``.
        ignore_layers: Student layers left dense (the output layer always is).
        granularity: ``epoch`` or ``batch`` (the schedule runs on fractional epochs).

    Example:
        >>> pruning = UnstructuredPruning("cubic", target_sparsity=0.8, end_epoch=5)
        >>> Trainer(callbacks=[pruning]).fit(module, datamodule)
        >>> pruning.report()["global"]
        0.8
    """

    def __init__(
        self,
        schedule: str | Callable[[float], float] = "cubic",
        initial_sparsity: float = 0.0,
        target_sparsity: float = 0.5,
        start_epoch: int = 0,
        end_epoch: int = 3,
        global_pruning: bool = False,
        pattern: str = "unstructured",
        ignore_layers: Sequence[str] = (),
        granularity: str = "epoch",
    ) -> None:
        if pattern not in PATTERNS:
            raise UserError(f"'pattern' must be one of {', '.join(PATTERNS)}; got '{pattern}'")
        check_granularity(granularity)
        if pattern == "2:4" and target_sparsity > 0.5:
            raise UserError(f"'target_sparsity' must be <= 0.5 with pattern 2:4 (2 of every 4 "
                            f"weights are kept); got {target_sparsity}")
        ignore_layers = check_layer_list(ignore_layers)
        self.schedule = make_schedule(schedule, initial_sparsity, target_sparsity, start_epoch,
                                      end_epoch)
        self.global_pruning = bool(global_pruning)
        self.pattern = pattern
        self.ignore_layers = ignore_layers
        self.granularity = granularity
        self.sparsity = 0.0  # the last scheduled value applied
        self.history: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self._layers: dict[str, nn.Module] = {}
        self._prefix = ""
        self._student: nn.Module | None = None
        self._pending_masks: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> UnstructuredPruning:
        """Build from the recipe's ``prune`` section (a dict or ``distill.config.PruneConfig``)."""
        c = cfg if isinstance(cfg, Mapping) else dataclasses.asdict(cfg)
        return cls(c["schedule"], c["initial_sparsity"], c["target_sparsity"], c["start_epoch"],
                   c["end_epoch"], c["global_pruning"], c["pattern"], list(c["ignore_layers"]),
                   c["granularity"])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(pattern=self.pattern, granularity=self.granularity)

    # ----- layers and masks ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        student = getattr(pl_module, "student", None)
        if not isinstance(student, nn.Module):
            raise UserError("UnstructuredPruning needs a LightningModule with a `student` module")
        ignored = resolve_layer_names(student, self.ignore_layers, "prune.ignore_layers")
        ignored += [output_layer_name(student) or ""]
        skip = {id(m) for name in ignored if name for m in student.get_submodule(name).modules()}
        self._student = student
        self._prefix = next(n for n, m in pl_module.named_modules() if m is student)
        self._layers, self.skipped = {}, {}
        for name, layer in student.named_modules():
            if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) or id(layer) in skip:
                continue
            if self.pattern == "2:4" and _in_width(layer) % 4:
                self.skipped[name] = f"input width {_in_width(layer)} is not a multiple of 4"
                continue
            self._layers[name] = layer

    @staticmethod
    def _effective_weight(layer: nn.Module) -> torch.Tensor:
        if prune.is_pruned(layer) and hasattr(layer, "weight_mask"):
            return layer.weight_orig.detach() * layer.weight_mask
        return layer.weight.detach()

    def compute_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Keep-masks (bool) for ``sparsity``, never regrowing what is already pruned."""
        weights = {n: self._effective_weight(layer) for n, layer in self._layers.items()}
        if self.pattern == "2:4":
            masks = {n: nm_mask(w, sparsity) for n, w in weights.items()}
        else:
            masks = magnitude_masks(weights, sparsity, self.global_pruning)
        for name, layer in self._layers.items():
            if hasattr(layer, "weight_mask"):
                masks[name] &= layer.weight_mask.bool()
        return masks

    def _apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            layer = self._layers[name]
            if hasattr(layer, "weight_mask"):
                layer.weight_mask.copy_(mask.to(layer.weight_mask))
            else:  # re-registers the same Parameter as weight_orig: the optimizer is unaffected
                prune.custom_from_mask(layer, "weight", mask.to(layer.weight.device))
        self._detach_masked_weights()

    def _detach_masked_weights(self) -> None:
        """Replace each computed ``weight = weight_orig * weight_mask`` by its value.

        The prune hook leaves a non-leaf tensor (with its graph) as a plain attribute, and
        ``copy.deepcopy`` refuses those: the ONNX export of the student would fail. The next
        forward recomputes it, with gradients, anyway.
        """
        for layer in self._layers.values():
            if hasattr(layer, "weight_mask") and not layer.weight.is_leaf:
                layer.weight = layer.weight.detach()

    def report(self) -> dict[str, Any]:
        """Sparsity (share of zero weights) per pruned layer and over all of them."""
        zeros = total = 0
        layers = {}
        for name, layer in self._layers.items():
            w = self._effective_weight(layer)
            n_zero = int((w == 0).sum())
            layers[name] = n_zero / w.numel()
            zeros, total = zeros + n_zero, total + w.numel()
        return {"pattern": self.pattern, "layers": layers,
                "global": zeros / total if total else 0.0, "skipped": dict(self.skipped)}

    # ----- hooks -----------------------------------------------------------------------------
    def _step(self, pl_module: pl.LightningModule, t: float) -> None:
        scheduled = self.schedule(t)
        if scheduled <= self.sparsity + 1e-9 or not self._layers:
            return
        if pl_module.student is not self._student:
            raise UserError(f"unstructured pruning is due at epoch {t:g} but the student was "
                            "replaced (QAT?): end pruning before QAT starts "
                            "(prune.end_epoch < qat.start_epoch)")
        self._apply_masks(self.compute_masks(scheduled))
        self.sparsity = scheduled
        measured = self.report()["global"]
        self.history.append({"epoch": pl_module.current_epoch, "step": pl_module.global_step,
                             "sparsity": scheduled, "measured": measured})
        rank_zero_info(f"[UnstructuredPruning] epoch {pl_module.current_epoch}: scheduled "
                       f"{scheduled:.3f}, zero weights {measured:.3f} ({self.pattern})")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_masks:  # resumed: the checkpoint held dense weights
            self._apply_masks({n: m for n, m in self._pending_masks.items() if n in self._layers})
            self._pending_masks = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.granularity == "epoch":
            self._step(pl_module, float(trainer.current_epoch))
        pl_module.log("prune/sparsity", self.sparsity, on_step=False, on_epoch=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.granularity == "batch":
            self._step(pl_module, batch_step(trainer, batch_idx))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._detach_masked_weights()  # before validation / export deep-copy the student

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the masks permanent: plain ``weight`` parameters with zeros."""
        for layer in self._layers.values():
            if prune.is_pruned(layer) and hasattr(layer, "weight_mask"):
                prune.remove(layer, "weight")

    # ----- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Store dense ``weight`` tensors, so the checkpoint loads into a fresh model."""
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = fold_prune_masks(checkpoint["state_dict"])

    def state_dict(self) -> dict[str, Any]:
        masks = {n: layer.weight_mask.bool().cpu() for n, layer in self._layers.items()
                 if hasattr(layer, "weight_mask")}
        return {"sparsity": self.sparsity, "history": list(self.history), "masks": masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sparsity = float(state_dict["sparsity"])
        self.history = list(state_dict["history"])
        self._pending_masks = dict(state_dict.get("masks", {}))
