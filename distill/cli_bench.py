"""``distill bench MODEL.onnx``: latency of an ONNX file in ONNX Runtime, per batch size.

Example::

    distill bench runs/digits_kd/2026-01-01/student.onnx --batch 1,8,32 --threads 1
    distill bench student.onnx --json > latency.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from distill.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the .onnx file to time")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--inter-threads", type=int, default=1,
                        help="ONNX Runtime inter-op threads (default 1: operators in order)")
    parser.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt (default cpu)")
    parser.add_argument("--iters", type=int, default=200, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop a batch size's timed loop after this many seconds")
    parser.add_argument("--profile", action="store_true",
                        help="also show the operator types that take the most time")
    parser.add_argument("--subprocess", action="store_true",
                        help="measure in a fresh child process")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``.

    Raises:
        UserError: an item that is not an integer >= 1.
    """
    sizes = []
    for item in str(text).split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise UserError(f"--batch expects comma-separated integers >= 1, e.g. 1,8,32; "
                            f"got '{text}'")
        sizes.append(int(item))
    return sizes


def format_table(results: dict[int, dict[str, Any]]) -> str:
    """A fixed-width table: one row per batch size."""
    head = (f"{'batch':>5}  {'p50 ms':>8}  {'p95 ms':>8}  {'p99 ms':>8}  {'mean ms':>8}  "
            f"{'cv':>5}  {'samples/s':>10}  {'peak MiB':>8}")
    lines = [head, "-" * len(head)]
    for b, s in results.items():
        mem = s.get("peak_mem_mb")
        mem_text = f"{mem:8.1f}" if mem is not None else f"{'-':>8}"
        lines.append(
            f"{b:>5}  {s['p50_ms']:8.3f}  {s['p95_ms']:8.3f}  {s['p99_ms']:8.3f}  "
            f"{s['mean_ms']:8.3f}  {s['cv']:5.2f}  {s['throughput_qps']:10.1f}  {mem_text}"
        )
    for b, s in results.items():
        if s.get("profile"):
            lines.append(f"\nbatch {b}: top operator types (ORT profiler)")
            for op in s["profile"]:
                lines.append(f"  {op['op_type']:<24} {op['mean_ms']:8.3f} ms/run "
                             f"{100 * op['share']:5.1f}%")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from distill.export.latency import measure_latency

    sizes = parse_batch_sizes(args.batch)
    results = measure_latency(
        args.model, batch_sizes=sizes, provider=args.provider, threads=args.threads,
        inter_threads=args.inter_threads, warmup=args.warmup, iters=args.iters,
        time_budget_s=args.time_budget, subprocess=args.subprocess, profile=args.profile,
    )
    if args.json:
        print(json.dumps({"model": str(args.model), "results": {str(b): s for b, s in
                                                                 results.items()}}, indent=2))
        return 0
    first = next(iter(results.values()))
    print(f"{args.model}: ONNX Runtime {first['onnxruntime']}, {first['execution_provider']}, "
          f"{args.threads} intra-op / {args.inter_threads} inter-op threads, "
          f"{first['iters']} timed calls after {args.warmup} warm-up")
    print(format_table(results))
    return 0
