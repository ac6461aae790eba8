"""Channel pruning vs. unstructured pruning of the default student: accuracy, size, ORT latency.

One student (``resnet_student``, 1x32x32 digits) is trained, then every variant starts from its
weights and gets the same fine-tuning budget: 0% (fine-tuned only), 25/50/75% of the channels
removed by ``StructuredPruning`` (L1, per layer), and 50% of the weights zeroed by
``UnstructuredPruning``. Each is exported to ONNX and measured in ONNX Runtime (batch 1, one
thread; the variants are timed in interleaved rounds and the median of the rounds' p50/p99 is
reported). Accuracy is top-1 of the ONNX file on the test split. Usage:

    python scripts/bench_pruning.py [--epochs 12] [--finetune 6] [--ratios 0.25 0.5 0.75]
                                    [--schedule constant] [--round-to N] [--rounds 3]
                                    [--iters 300] [--json F]

Acceptance (printed under the table): 50% channel pruning at least halves params and MACs,
ORT p50 >= 1.8x faster than the unpruned student, accuracy at most 0.5 points below it after
fine-tuning; the unstructured 50% row shows no dense speed-up.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any


def _module(student: Any, example: Any, lr: float) -> Any:
    from distill.module import DistillationModule

    # Task loss only: this compares pruning methods, not distillation.
    return DistillationModule(student, None, 10, example, distill={"kd": {"weight": 0.0}},
                              optim={"name": "adamw", "lr": lr, "scheduler": "cosine"})


def _fit(module: Any, dm: Any, epochs: int, callbacks: list) -> None:
    import pytorch_lightning as pl

    pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, deterministic=True,
               num_sanity_val_steps=0).fit(module, datamodule=dm)


def _variants(ratios: list[float], schedule: str, finetune: int, round_to: int | None
              ) -> list[tuple[str, Any]]:
    from distill.callbacks.structured_pruning import StructuredPruning
    from distill.callbacks.unstructured_pruning import UnstructuredPruning

    end = 0 if schedule == "constant" else max(finetune // 2, 1)
    rows: list[tuple[str, Any]] = [("channels 0%", None)]
    for r in (r for r in ratios if r > 0):
        rows.append((f"channels {round(100 * r)}%" + (f" round_to {round_to}" if round_to else ""),
                     lambda r=r: StructuredPruning(schedule, target_sparsity=r, start_epoch=0,
                                                   end_epoch=end, round_to=round_to)))
    rows.append(("unstructured 50%", lambda: UnstructuredPruning(
        schedule, target_sparsity=0.5, start_epoch=0, end_epoch=end)))
    return rows


def _latency(paths: dict[str, Path], rounds: int, iters: int) -> dict[str, dict[str, float]]:
    from distill.export.latency import measure_latency

    seen: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits every variant
        for name, path in paths.items():
            seen[name].append(measure_latency(path, (1,), threads=1, warmup=50, iters=iters)[1])
    return {name: {k: statistics.median(s[f"{k}_ms"] for s in stats) for k in ("p50", "p99")}
            for name, stats in seen.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch

    from distill.arch import count_macs_params
    from distill.data import DigitsDataModule
    from distill.export.onnx import evaluate_onnx, export_onnx
    from distill.models import build_model

    pl.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(batch_size=64, image_size=32, seed=args.seed)
    dm.prepare()
    example = torch.zeros(1, 1, 32, 32)
    base = _module(build_model("resnet_student", 1, 10), example, args.lr)
    _fit(base, dm, args.epochs, [])
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in _variants(args.ratios, args.schedule, args.finetune, args.round_to):
            pl.seed_everything(args.seed, verbose=False)
            module = _module(copy.deepcopy(base.student), example, args.lr * args.finetune_lr)
            _fit(module, dm, args.finetune, [make()] if make else [])
            path = Path(tmp) / f"{name.replace(' ', '_').replace('%', '')}.onnx"
            export_onnx(module.student, path, example)
            macs, params = count_macs_params(module.student, example)
            zeros = sum(int((p == 0).sum()) for p in module.student.parameters())
            rows[name] = {"accuracy": evaluate_onnx(path, dm.test_dataloader()),
                          "params": params, "nonzero_params": params - zeros, "macs": macs,
                          "size_mb": path.stat().st_size / 2**20}
            paths[name] = path
            print(f"{name}: test accuracy {rows[name]['accuracy']:.4f}", file=sys.stderr)
        for name, lat in _latency(paths, args.rounds, args.iters).items():
            rows[name].update(lat)
    return rows


def table(rows: dict[str, dict[str, Any]]) -> str:
    ref = rows["channels 0%"]
    lines = ["| variant | test acc % | Δ acc (pts) | params | non-zero params | MACs | "
             "ONNX MB | p50 ms | p99 ms | p50 speed-up |", "|---" * 10 + "|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - ref['accuracy']):+.2f}"
            f" | {r['params']:,} | {r['nonzero_params']:,} | {r['macs'] / 1e6:.2f} M"
            f" | {r['size_mb']:.3f} | {r['p50']:.3f} | {r['p99']:.3f}"
            f" | {ref['p50'] / r['p50']:.2f}x |")
    return "\n".join(lines)


def acceptance(rows: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    ref, half = rows["channels 0%"], rows.get("channels 50%")
    if half is None:
        return []
    checks = [
        (f"50% channels: params x{half['params'] / ref['params']:.2f} (<= 0.5)",
         half["params"] <= 0.5 * ref["params"]),
        (f"50% channels: MACs x{half['macs'] / ref['macs']:.2f} (<= 0.5)",
         half["macs"] <= 0.5 * ref["macs"]),
        (f"50% channels: p50 {ref['p50'] / half['p50']:.2f}x faster (>= 1.8x)",
         ref["p50"] / half["p50"] >= 1.8),
        # One-sided: a pruned student that scores higher than the unpruned one passes.
        (f"50% channels: accuracy {100 * (half['accuracy'] - ref['accuracy']):+.2f} pts "
         "(loses <= 0.5)", half["accuracy"] - ref["accuracy"] >= -0.005),
    ]
    unstructured = rows.get("unstructured 50%")
    if unstructured is not None:
        speed = ref["p50"] / unstructured["p50"]
        checks.append((f"unstructured 50%: p50 {speed:.2f}x (no dense speed-up: < 1.2x)",
                       speed < 1.2))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12, help="training epochs of the base student")
    p.add_argument("--finetune", type=int, default=6, help="fine-tuning epochs of every variant")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="channel shares removed (the unpruned 0%% row is always there)")
    p.add_argument("--schedule", default="constant", help="pruning schedule of the variants")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep channel counts multiples of this (ORT's AVX-512 kernels like 16)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--finetune-lr", type=float, default=1.0, help="fine-tune LR, x --lr")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = run(args)
    print(table(rows))
    for text, ok in acceptance(rows):
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        from distill.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
