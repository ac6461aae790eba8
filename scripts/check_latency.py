"""Check ``distill bench``'s numbers against a plain, hand-written ONNX Runtime loop.

Both time the same ONNX file in the same process, alternating in rounds so that machine drift
hits both alike; the p50s should agree within 10%. With ``--epoch-cost`` it also times what
``ExportAndMeasure`` does once per epoch (export, parity, ORT accuracy on digits, latency).

Usage::

    python scripts/check_latency.py                      # the reference student, batch 1
    python scripts/check_latency.py model.onnx --threads 2 --batch 8
    python scripts/check_latency.py --epoch-cost
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_ort_p50(path: Path, batch: int, threads: int, warmup: int, iters: int) -> float:
    """The simplest honest loop: one session, explicit threads, perf_counter around run()."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    meta = sess.get_inputs()[0]
    shape = [batch] + [int(d) for d in meta.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {meta.name: x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, {meta.name: x})
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.percentile(times, 50))


def reference_student(folder: Path, image_size: int = 32) -> Path:
    import torch

    from distill.export.onnx import export_onnx
    from distill.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet_student", 1, 10)
    path = folder / "resnet_student.onnx"
    export_onnx(model, path, torch.zeros(1, 1, image_size, image_size))
    return path


def compare(path: Path, batch: int, threads: int, warmup: int, iters: int, rounds: int) -> float:
    from distill.export.latency import measure_latency

    lib, plain = [], []
    for _ in range(rounds):
        res = measure_latency(path, [batch], threads=threads, warmup=warmup, iters=iters)
        lib.append(res[batch]["p50_ms"])
        plain.append(plain_ort_p50(path, batch, threads, warmup, iters))
    lib_p50, plain_p50 = statistics.median(lib), statistics.median(plain)
    ratio = lib_p50 / plain_p50
    print(f"model {path.name}, batch {batch}, {threads} thread(s), {iters} timed calls x "
          f"{rounds} rounds (median of round p50s)")
    print(f"{'':24}{'p50 ms':>10}   rounds")
    print(f"{'distill bench (library)':24}{lib_p50:10.4f}   "
          + " ".join(f"{v:.4f}" for v in lib))
    print(f"{'plain ORT loop':24}{plain_p50:10.4f}   " + " ".join(f"{v:.4f}" for v in plain))
    verdict = "OK" if abs(ratio - 1.0) <= 0.10 else "DIFFERS BY MORE THAN 10%"
    print(f"ratio bench/plain: {ratio:.3f}  -> {verdict}")
    return ratio


def epoch_cost(folder: Path, iters: int, warmup: int) -> None:
    """Seconds of each step ExportAndMeasure runs per epoch, for the reference student."""
    import torch

    from distill.data import DigitsDataModule
    from distill.export.latency import measure_latency
    from distill.export.onnx import evaluate_onnx, export_onnx, parity_check
    from distill.models import build_model

    torch.manual_seed(0)
    # One torch thread: on a small, busy machine OpenMP barriers make a 2-thread forward many
    # times slower (seen here: 0.9 s vs 0.1 s for a batch of 64), which is not the callback's cost.
    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=64, image_size=32, seed=0)
    dm.prepare()
    model = build_model("resnet_student", 1, 10)
    loader = dm.val_dataloader()
    batch = next(iter(loader))
    steps: dict[str, float] = {}
    for i in range(2):  # the first export in a process pays the exporter's one-time set-up
        t0 = time.perf_counter()
        export_onnx(model, folder / "epoch.onnx", batch[0][:1])
        steps["export (first in process)" if i == 0 else "export"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parity_check(model, folder / "epoch.onnx", batch)
    steps["parity (1 batch)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_onnx(folder / "epoch.onnx", loader)
    steps[f"ORT accuracy ({len(dm.dataset('val'))} val samples)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    measure_latency(folder / "epoch.onnx", [1], warmup=warmup, iters=iters)
    steps[f"latency (batch 1, {warmup}+{iters} calls)"] = time.perf_counter() - t0
    print("\nExportAndMeasure cost per epoch, resnet_student 1x32x32, 1 ORT / 1 torch thread:")
    for name, sec in steps.items():
        print(f"  {name:<40}{sec:8.2f} s")
    per_epoch = sum(v for k, v in steps.items() if not k.startswith("export (first"))
    print(f"  {'total per epoch (steady state)':<40}{per_epoch:8.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="ONNX file (default: the reference student)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epoch-cost", action="store_true",
                        help="also time ExportAndMeasure's per-epoch steps")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="check_latency_") as tmp:
        path = Path(args.model) if args.model else reference_student(Path(tmp))
        ratio = compare(path, args.batch, args.threads, args.warmup, args.iters, args.rounds)
        if args.epoch_cost:
            epoch_cost(Path(tmp), args.iters, args.warmup)
    return 0 if abs(ratio - 1.0) <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
