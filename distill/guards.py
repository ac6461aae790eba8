"""Run guards: stop a diverged run with one clear line, before it spoils the next checkpoint.

``NonFiniteLossGuard`` checks the training loss just before each ``backward``. The first NaN or
infinite loss stops the run by raising :class:`TrainingDiverged`, *before* the bad gradients
reach the weights: the checkpoint written at the end of the last validation (``last.ckpt``)
stays the last good one, and nothing after it is written (``ModelCheckpoint`` saves only at
validation end, and ``deliver`` never runs on a failed fit).

``distill train`` prints the message as one line and exits with code 1: a diverged run is a
failure of the run, not a malformed input (exit 2 is for inputs that are rejected before
anything starts), even though the usual cure is a recipe change (a lower ``optim.lr`` or a
``trainer.gradient_clip_val``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message is one line with a hint.

    Attributes:
        checkpoint: The last good checkpoint on disk, or None if none was written yet.
    """

    exit_code = 1

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteLossGuard(Callback):
    """Stop training at the first NaN/inf training loss (checked before ``backward``).

    Under DDP every rank checks its own loss and the ranks agree with
    ``reduce_boolean_decision(any)``, so all of them stop at the same step instead of one rank
    raising while the others wait in the gradient all-reduce.

    Args:
        hint: Appended to the message: what to change in the recipe.

    Example:
        >>> trainer = Trainer(callbacks=[NonFiniteLossGuard()])
    """

    def __init__(self, hint: str = "lower optim.lr or set trainer.gradient_clip_val") -> None:
        if not isinstance(hint, str):
            raise ValueError(f"NonFiniteLossGuard: 'hint' must be a string; got {hint!r}")
        self.hint = hint

    @staticmethod
    def _is_finite(loss: torch.Tensor | float) -> bool:
        """The decision, apart from its effect."""
        if isinstance(loss, torch.Tensor):
            return bool(torch.isfinite(loss.detach()).all())
        return math.isfinite(float(loss))

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule,
                           loss: torch.Tensor) -> None:
        bad = not self._is_finite(loss)
        if trainer.world_size > 1:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if bad:
            raise TrainingDiverged(self.message(trainer, loss), self._last_checkpoint(trainer))

    @staticmethod
    def _last_checkpoint(trainer: Trainer) -> str | None:
        cb = trainer.checkpoint_callback
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        return path if path and Path(path).is_file() else None

    def message(self, trainer: Trainer, loss: Any) -> str:
        """One line: what, where, what was kept, what to change."""
        if self._is_finite(loss):  # this rank is fine: another one diverged
            what = "is not finite on another rank"
        else:
            value = loss.detach().float().mean() if isinstance(loss, torch.Tensor) else loss
            what = f"is {float(value)}"
        ckpt = self._last_checkpoint(trainer)
        kept = (f"the last good checkpoint is kept: {ckpt}" if ckpt
                else "no checkpoint had been written yet")
        return (f"training diverged: the training loss {what} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; stopped before the "
                f"update, {kept}; {self.hint}")
