"""``TargetStop``: stop training as soon as the exported student meets its targets.

Targets are read from ``ExportAndMeasure``'s latest row, i.e. from the ONNX file as it runs in
ONNX Runtime (accuracy on the validation set, p99 latency, file size), never from the PyTorch
module. The decision (:meth:`TargetStop._should_stop`) is a near-pure function of a row; the
hook agrees across ranks and sets ``trainer.should_stop``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_info

from distill.callbacks.export_and_measure import ExportAndMeasure
from distill.errors import UserError


def row_accuracy(row: dict[str, Any]) -> float | None:
    """The accuracy that ships: the ONNX file's in ORT, else the PyTorch validation one."""
    acc = row.get("val_accuracy_onnx")
    return row.get("val_accuracy") if acc is None else acc


class TargetStop(Callback):
    """Stop when accuracy, p99 latency and file size targets are all met.

    Args:
        accuracy: Absolute accuracy target in [0, 1].
        max_accuracy_drop: Largest accuracy drop below the teacher, in percentage points
            (``1.0`` = one point: teacher 0.98 -> student must reach 0.97). Needs
            ``teacher_accuracy``. With ``accuracy`` also set, the stricter one applies.
        teacher_accuracy: The teacher's accuracy in [0, 1].
        p99_ms: Largest p99 latency (ms) of the first measured batch size.
        size_mb: Largest ONNX file size (MiB).
        confirm_margin: When every target is met but p99 lies within this share below its
            target (``p99 >= p99_ms * (1 - confirm_margin)``), time the file once more and
            stop only if the new p99 also meets the target. 0 disables.
        measure: The ``ExportAndMeasure`` whose rows are read; default the first one in
            ``trainer.callbacks`` (it must come before this callback).
        require_parity: Never count an epoch whose ONNX fails the parity check as met.

    With no target set, it never stops and only picks the delivered epoch
    (:meth:`choose_delivery`).

    Example:
        >>> callbacks = [ExportAndMeasure(run_dir), TargetStop(accuracy=0.95, p99_ms=2.0)]
    """

    def __init__(
        self,
        accuracy: float | None = None,
        max_accuracy_drop: float | None = None,
        teacher_accuracy: float | None = None,
        p99_ms: float | None = None,
        size_mb: float | None = None,
        confirm_margin: float = 0.1,
        measure: ExportAndMeasure | None = None,
        require_parity: bool = True,
    ) -> None:
        for name, value in (("accuracy", accuracy), ("teacher_accuracy", teacher_accuracy)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"TargetStop: '{name}' must be in [0, 1]; got {value}")
        for name, value in (("max_accuracy_drop", max_accuracy_drop), ("p99_ms", p99_ms),
                            ("size_mb", size_mb)):
            if value is not None and not value > 0:
                raise UserError(f"TargetStop: '{name}' must be > 0; got {value}")
        if max_accuracy_drop is not None and teacher_accuracy is None:
            raise UserError(
                "TargetStop: 'max_accuracy_drop' needs the teacher's accuracy "
                "(teacher_accuracy is None); set an absolute 'accuracy' target instead"
            )
        if not 0.0 <= confirm_margin < 1.0:
            raise UserError(f"TargetStop: 'confirm_margin' must be in [0, 1); got {confirm_margin}")
        self.accuracy = accuracy
        self.max_accuracy_drop = max_accuracy_drop
        self.teacher_accuracy = teacher_accuracy
        self.p99_ms = p99_ms
        self.size_mb = size_mb
        self.confirm_margin = confirm_margin
        self.require_parity = require_parity
        self._measure_arg = measure
        self._measure: ExportAndMeasure | None = measure
        self.met_at_epoch: int | None = None
        self.stop_reason: str | None = None
        self.last_reason: str | None = None
        self._decided_epoch: int | None = None

    # ----- the decision ------------------------------------------------------------------
    @property
    def required_accuracy(self) -> float | None:
        """The accuracy to reach: the stricter of the absolute and the relative target."""
        options = []
        if self.accuracy is not None:
            options.append(self.accuracy)
        if self.max_accuracy_drop is not None and self.teacher_accuracy is not None:
            options.append(self.teacher_accuracy - self.max_accuracy_drop / 100.0)
        return max(options) if options else None

    @property
    def has_targets(self) -> bool:
        return any(v is not None for v in (self.required_accuracy, self.p99_ms, self.size_mb))

    def _checks(self, row: dict[str, Any], latency_only: bool = False) -> list[tuple[bool, str]]:
        """(met, text) per target that is set."""
        checks = []
        required = None if latency_only else self.required_accuracy
        if required is not None:
            acc = row_accuracy(row)
            ok = acc is not None and acc >= required - 1e-12
            checks.append((ok, f"accuracy {_fmt(acc, '.4f')} {'>=' if ok else '<'} "
                               f"{required:.4f}"))
        for key, target, unit in (("p99_ms", self.p99_ms, " ms"), ("size_mb", self.size_mb,
                                                                   " MB")):
            if target is None:
                continue
            value = row.get(key)
            ok = value is not None and math.isfinite(value) and value <= target
            name = key.split("_")[0]
            checks.append((ok, f"{name} {_fmt(value, '.3f')}{unit} {'<=' if ok else '>'} "
                               f"{target:g}{unit}"))
        return checks

    def _usable(self, row: dict[str, Any] | None) -> tuple[bool, str]:
        if row is None:
            return False, "no measurement"
        if row.get("error"):
            return False, f"epoch {row.get('epoch')}: measurement failed ({row['error']})"
        if self.require_parity and row.get("parity_ok") is False:
            return False, (f"epoch {row.get('epoch')}: ONNX parity check failed (max abs "
                           f"diff {_fmt(row.get('parity_max_abs'), '.2e')})")
        return True, ""

    def _should_stop(self, row: dict[str, Any] | None) -> tuple[bool, str]:
        """Whether ``row`` meets every target that is set, and a one-line reason."""
        if not self.has_targets:
            return False, "no targets set"
        usable, why = self._usable(row)
        if not usable:
            return False, why
        assert row is not None
        checks = self._checks(row)
        unmet = [text for ok, text in checks if not ok]
        if unmet:
            return False, f"epoch {row.get('epoch')}: not met: {'; '.join(unmet)}"
        return True, f"epoch {row.get('epoch')}: targets met: {'; '.join(t for _, t in checks)}"

    def _needs_confirm(self, row: dict[str, Any]) -> bool:
        if self.p99_ms is None or self.confirm_margin <= 0 or row.get("p99_ms") is None:
            return False
        return row["p99_ms"] >= self.p99_ms * (1.0 - self.confirm_margin)

    # ----- the effect --------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # The targets as given: the teacher's accuracy is re-measured on resume and may differ.
        return self._generate_state_key(accuracy=self.accuracy,
                                        max_accuracy_drop=self.max_accuracy_drop,
                                        p99_ms=self.p99_ms, size_mb=self.size_mb)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        callbacks = list(trainer.callbacks)
        if self._measure_arg is None:
            self._measure = next((c for c in callbacks if isinstance(c, ExportAndMeasure)), None)
        if self._measure is None:
            raise UserError("TargetStop needs an ExportAndMeasure callback in the Trainer")
        if self._measure not in callbacks:
            raise UserError("TargetStop: the ExportAndMeasure it was given is not among the "
                            "Trainer's callbacks")
        if callbacks.index(self._measure) > callbacks.index(self):
            raise UserError("TargetStop must come after ExportAndMeasure in the callbacks list "
                            "(it reads the row ExportAndMeasure has just measured)")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._measure is None:
            return
        row = self._measure.latest_row
        epoch = trainer.current_epoch
        if row is None or row.get("epoch") != epoch or self._decided_epoch == epoch:
            return  # nothing new was measured in this validation
        self._decided_epoch = epoch
        stop, reason = self._should_stop(row)
        if stop and self._needs_confirm(row):
            stop, reason = self._confirm(trainer, row)
        # Rows are broadcast, so ranks agree already; reducing keeps a stray rank from hanging.
        stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        self.last_reason = reason
        if not stop:
            return
        trainer.should_stop = True
        if self.met_at_epoch is None:
            self.met_at_epoch = int(epoch)
            self.stop_reason = reason
        rank_zero_info(f"TargetStop: {reason}; stopping")

    def _confirm(self, trainer: Trainer, row: dict[str, Any]) -> tuple[bool, str]:
        """Time the row's ONNX once more (rank 0), share it, and decide on the new p99."""
        assert self._measure is not None
        new = None
        if trainer.is_global_zero:
            try:
                new = self._measure.latency(row["onnx"])
            except Exception as exc:  # keep training; a failed re-check is a "not yet"
                new = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        new = trainer.strategy.broadcast(new, src=0)
        if new is None or new.get("error"):
            return False, f"epoch {row.get('epoch')}: p99 re-measurement failed"
        stop, reason = self._should_stop({**row, **new})
        verdict = "confirmed" if stop else "not confirmed"
        return stop, (f"{reason} (p99 {verdict} by a second measurement: first "
                      f"{row['p99_ms']:.3f} ms, second {new['p99_ms']:.3f} ms)")

    def state_dict(self) -> dict[str, Any]:
        return {"met_at_epoch": self.met_at_epoch, "stop_reason": self.stop_reason,
                "last_reason": self.last_reason}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.met_at_epoch = state_dict.get("met_at_epoch")
        self.stop_reason = state_dict.get("stop_reason")
        self.last_reason = state_dict.get("last_reason")

    # ----- delivery ----------------------------------------------------------------------
    def choose_delivery(
        self, rows: Sequence[dict[str, Any]]
    ) -> tuple[dict[str, Any] | None, str]:
        """The epoch to deliver, and why.

        In order: the epoch that met the targets; else the most accurate epoch that meets the
        latency and size targets ("best feasible"); else the most accurate epoch. Rows with an
        ``error`` (or without an ONNX file) are never chosen; parity failures only as a last
        resort. Ties in accuracy go to the lower p99.
        """
        valid = [r for r in rows if not r.get("error") and r.get("onnx")]
        if not valid:
            return None, "no epoch was exported and measured without error"
        if self.met_at_epoch is not None:
            met = [r for r in valid if r.get("epoch") == self.met_at_epoch]
            if met:
                return met[-1], f"epoch {self.met_at_epoch} met the targets ({self.stop_reason})"
        met = [r for r in valid if self._should_stop(r)[0]]
        if met:
            return met[0], f"epoch {met[0]['epoch']} met the targets"
        usable = [r for r in valid if self._usable(r)[0]] or valid
        if self.p99_ms is not None or self.size_mb is not None:
            feasible = [r for r in usable if all(ok for ok, _ in self._checks(r, True))]
            if feasible:
                best = max(feasible, key=_rank)
                return best, (f"no epoch met every target; epoch {best['epoch']} is the most "
                              "accurate that meets the latency/size targets")
        best = max(usable, key=_rank)
        what = "no target was set" if not self.has_targets else "no epoch met the targets"
        return best, f"{what}; epoch {best['epoch']} is the most accurate"


def _rank(row: dict[str, Any]) -> tuple[float, float]:
    acc = row_accuracy(row)
    p99 = row.get("p99_ms")
    return (acc if acc is not None else -1.0, -(p99 if p99 is not None else math.inf))


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
