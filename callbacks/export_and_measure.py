"""``ExportAndMeasure``: every N epochs, export the student to ONNX and measure what ships.

After each due validation, global rank 0 exports ``pl_module.student`` to
``out_dir/epochs/epoch_NNN.onnx``, checks parity against the PyTorch student on a real
validation batch, scores the ONNX file on the whole validation set in ONNX Runtime, and times
it (p50/p95/p99). The numbers form one *row*; the row is broadcast to every rank, logged to
every logger, and kept in ``rows`` (saved in checkpoints), where ``TargetStop`` and the final
report read it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from distill.arch import count_macs
from distill.errors import UserError
from distill.export.latency import measure_latency
from distill.export.onnx import (
    PROVIDERS,
    count_quant_nodes,
    eval_mode,
    evaluate_onnx,
    export_onnx,
    parity_check,
)

#: Row keys logged to every logger (row key -> metric name).
LOGGED = {
    "val_accuracy_onnx": "val/accuracy_onnx",
    "p50_ms": "latency/p50_ms",
    "p99_ms": "latency/p99_ms",
    "size_mb": "onnx/size_mb",
    "parity_max_abs": "parity/max_abs",
}


def _weights(model: nn.Module) -> list[torch.Tensor]:
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    weights = [m.weight for m in model.modules() if isinstance(m, layers)]
    return weights or [p for p in model.parameters() if p.dim() >= 2]


def weight_count(model: nn.Module) -> int:
    """Number of convolution and linear weights (the base of ``weight_sparsity``)."""
    return sum(w.numel() for w in _weights(model))


def weight_sparsity(model: nn.Module, initial_weights: int | None = None) -> float:
    """Share of the student's original conv/linear weights that are gone or exactly zero.

    ``1 − nonzero / initial``: channels removed by structured pruning count as well as weights
    zeroed by masks (``module.weight`` is read, so ``torch.nn.utils.prune`` masks count). A
    graph module without such layers (a ``torch.export``-ed student) falls back to every
    parameter with two or more dimensions. Without ``initial_weights`` the current total is
    the base (zeros only).
    """
    weights = _weights(model)
    nonzero = sum(int((w != 0).sum()) for w in weights)
    total = initial_weights or sum(w.numel() for w in weights)
    return max(0.0, 1.0 - nonzero / total) if total else 0.0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class ExportAndMeasure(Callback):
    """Export the student to ONNX every ``every_n_epochs`` and measure it in ONNX Runtime.

    Args:
        out_dir: Run directory; files go to ``out_dir/epochs/epoch_NNN.onnx``. None uses
            ``trainer.default_root_dir``.
        every_n_epochs: Measure after the validation of every N-th epoch (and the last one).
        batch_sizes: Batch sizes to time; the row's ``p50_ms``... are those of the first.
        threads: ONNX Runtime intra-op threads (latency and ORT accuracy).
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (ORT execution provider).
        warmup: Untimed calls before timing.
        iters: Timed calls per batch size.
        subprocess: Time in a fresh child process, away from the training threads.
        parity_atol: Largest absolute logit difference PyTorch vs ONNX that counts as parity.
        val_loader_fn: Returns the loader to score the ONNX file on; default
            ``trainer.datamodule.val_dataloader()`` (not the trainer's own loader, which under
            DDP holds only one rank's shard), else ``trainer.val_dataloaders``.
        opset: ONNX opset of the FP32 export.
        tensorrt: Also time the file as a native TensorRT engine (needs ``tensorrt`` and a
            GPU); the row gets ``tensorrt`` (p50/p95/p99 of the first batch size) or
            ``tensorrt_error``. A failure there does not mark the row as failed.

    A failed export or measurement never stops training: the row gets ``error`` (one line)
    and a warning is issued.

    Example:
        >>> trainer = Trainer(callbacks=[ExportAndMeasure("runs/x", iters=200), TargetStop(
        ...     accuracy=0.95, p99_ms=2.0)])
    """

    def __init__(
        self,
        out_dir: str | Path | None = None,
        every_n_epochs: int = 1,
        batch_sizes: Sequence[int] = (1,),
        threads: int = 1,
        provider: str = "cpu",
        warmup: int = 20,
        iters: int = 200,
        subprocess: bool = False,
        parity_atol: float = 1e-3,
        val_loader_fn: Callable[[], Iterable] | None = None,
        opset: int = 20,
        tensorrt: bool = False,
        exporter: str = "auto",
    ) -> None:
        sizes = list(batch_sizes)
        if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
            raise UserError(f"ExportAndMeasure: 'batch_sizes' must be integers >= 1; got {sizes}")
        positive = {"every_n_epochs": every_n_epochs, "threads": threads, "iters": iters}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"ExportAndMeasure: '{name}' must be an integer >= 1; got {value}")
        if not isinstance(warmup, int) or warmup < 0:
            raise UserError(f"ExportAndMeasure: 'warmup' must be an integer >= 0; got {warmup}")
        if provider not in PROVIDERS:
            raise UserError(f"ExportAndMeasure: unknown provider '{provider}'; expected one of "
                            f"{', '.join(PROVIDERS)}")
        if not parity_atol > 0:
            raise UserError(f"ExportAndMeasure: 'parity_atol' must be > 0; got {parity_atol}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.every_n_epochs = every_n_epochs
        self.batch_sizes = sizes
        self.threads = threads
        self.provider = provider
        self.warmup = warmup
        self.iters = iters
        self.subprocess = subprocess
        self.parity_atol = parity_atol
        self.val_loader_fn = val_loader_fn
        self.opset = opset
        self.exporter = exporter
        self.tensorrt = tensorrt
        if tensorrt:
            from distill.export.tensorrt import import_tensorrt

            import_tensorrt()  # fail now, with the install hint, not after the first epoch
        self.rows: list[dict[str, Any]] = []
        self.int8_min_top1 = 0.99
        self.initial_weights: int | None = None

    # ----- Lightning plumbing ------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs,
                                        out_dir=str(self.out_dir))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.initial_weights is None:  # a resumed run keeps the count of the original
            self.initial_weights = weight_count(pl_module.student)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "initial_weights": self.initial_weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
        self.initial_weights = state_dict.get("initial_weights")

    @property
    def latest_row(self) -> dict[str, Any] | None:
        """The last measured row (None before the first measurement)."""
        return self.rows[-1] if self.rows else None

    def _due(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs > 0
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._due(trainer):
            return
        started = getattr(self, "_epoch_start", None)
        # training + validation time of this epoch, before export: the base of the overhead share
        epoch_s = None if started is None else round(time.perf_counter() - started, 3)
        if self.latest_row is not None and self.latest_row["epoch"] == trainer.current_epoch:
            return  # a second validation in the same epoch (val_check_interval < 1)
        row = self.measure(trainer, pl_module) if trainer.is_global_zero else None
        if row is not None:
            row["epoch_s"] = epoch_s
        row = trainer.strategy.broadcast(row, src=0)
        self.rows.append(row)
        self._publish(trainer, row)

    # ----- measuring ---------------------------------------------------------------------
    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """Export and measure the current student; returns the row (``error`` on failure)."""
        epoch = int(trainer.current_epoch)
        metric = trainer.callback_metrics.get("val/accuracy")
        row: dict[str, Any] = {
            "epoch": epoch, "val_accuracy": None if metric is None else float(metric),
            "val_accuracy_onnx": None, "p50_ms": None, "p95_ms": None, "p99_ms": None,
            "mean_ms": None, "throughput_qps": None, "size_mb": None, "parity_max_abs": None,
            "parity_top1": None, "parity_ok": None, "params": None, "macs": None,
            "sparsity": None, "quantized": None, "onnx": None, "error": None,
        }
        start = time.perf_counter()
        student = pl_module.student
        try:
            with eval_mode(student):  # restores every submodule's own train/eval mode
                self._fill(row, trainer, pl_module, student, epoch)
        except Exception as exc:  # the run goes on; the row says what went wrong
            row["error"] = _one_line(exc)
            rank_zero_warn(f"ExportAndMeasure: epoch {epoch} failed: {row['error']}")
        row["measure_s"] = round(time.perf_counter() - start, 3)
        return row

    def _fill(self, row: dict[str, Any], trainer: Trainer, pl_module: LightningModule,
              student: nn.Module, epoch: int) -> None:
        path = Path(self.out_dir or trainer.default_root_dir) / "epochs" / f"epoch_{epoch:03d}.onnx"
        loader = self._val_loader(trainer)
        first = next(iter(loader))
        example = getattr(pl_module, "example_input", None)
        if example is None:
            example = (first[0] if isinstance(first, (list, tuple)) else first)[:1]
        exporter = getattr(pl_module, "exporter", None)
        if exporter is not None:
            info = exporter(student, path, example.detach().cpu()) or {}
        else:
            info = export_onnx(student, path, example, opset=self.opset, exporter=self.exporter)
        row["onnx"] = str(path)
        row["size_mb"] = round(path.stat().st_size / 2**20, 4)
        row["export_s"] = round(float(info.get("export_s", 0.0)), 3)
        row["quantized"] = bool(info.get("quantized")) or count_quant_nodes(path) > 0
        row["params"] = int(sum(p.numel() for p in student.parameters()))
        row["sparsity"] = round(weight_sparsity(student, self.initial_weights), 6)
        row["macs"] = count_macs(student, example) or None
        prev = self.latest_row
        if row["macs"] is None and prev and prev.get("params") == row["params"]:
            row["macs"] = prev.get("macs")  # an exported (QAT) graph: same shapes as before
        parity = parity_check(student, path, first, threads=self.threads,
                              provider=self.provider)
        row["parity_max_abs"] = float(parity["max_abs"])
        row["parity_top1"] = float(parity["top1_agreement"])
        if row["quantized"]:
            # INT8 vs the fake-quant model differs by about one logit quantization step, so
            # max-abs says little; what must hold is that they predict the same classes.
            row["parity_ok"] = bool(parity["top1_agreement"] >= self.int8_min_top1)
        else:
            row["parity_ok"] = bool(parity["max_abs"] <= self.parity_atol)
        row["val_accuracy_onnx"] = float(
            evaluate_onnx(path, loader, threads=self.threads, provider=self.provider)
        )
        row.update(self.latency(path))
        if self.tensorrt:
            row.update(self._tensorrt_latency(path))

    def latency(self, path: str | Path) -> dict[str, Any]:
        """Latency fields of a row for an ONNX file (used again by ``TargetStop`` to confirm)."""
        res = measure_latency(path, self.batch_sizes, provider=self.provider,
                              threads=self.threads, warmup=self.warmup, iters=self.iters,
                              subprocess=self.subprocess)
        head = res[self.batch_sizes[0]]
        out: dict[str, Any] = {k: float(head[k]) for k in
                               ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "throughput_qps", "cv")}
        out["peak_mem_mb"] = head["peak_mem_mb"]
        out["latency"] = {
            str(b): {k: float(s[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms",
                                              "throughput_qps", "cv")}
            for b, s in res.items()
        }
        return out

    def _tensorrt_latency(self, path: Path) -> dict[str, Any]:
        from distill.export.tensorrt import measure_tensorrt_latency

        try:
            res = measure_tensorrt_latency(path, self.batch_sizes, warmup=self.warmup,
                                           iters=self.iters)
        except Exception as exc:  # the ONNX Runtime numbers still stand
            return {"tensorrt": None, "tensorrt_error": _one_line(exc)}
        head = res[self.batch_sizes[0]]
        return {"tensorrt": {k: float(head[k]) for k in ("p50_ms", "p95_ms", "p99_ms",
                                                          "mean_ms", "throughput_qps")},
                "tensorrt_error": None}

    def _val_loader(self, trainer: Trainer) -> Iterable:
        if self.val_loader_fn is not None:
            return self.val_loader_fn()
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "val_dataloader"):
            return dm.val_dataloader()
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise UserError("ExportAndMeasure needs validation data: give the Trainer a "
                            "val loader or pass val_loader_fn")
        return loaders

    # ----- publishing --------------------------------------------------------------------
    def _publish(self, trainer: Trainer, row: dict[str, Any]) -> None:
        metrics = {name: float(row[key]) for key, name in LOGGED.items()
                   if row.get(key) is not None}
        # callback_metrics too, so ModelCheckpoint / EarlyStopping can monitor these on any rank
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if row.get("error"):
            return
        rank_zero_info(
            f"epoch {row['epoch']}: ONNX acc {row['val_accuracy_onnx']:.4f}, "
            f"p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms, "
            f"{row['size_mb']:.3f} MB, parity {row['parity_max_abs']:.2e}"
        )
