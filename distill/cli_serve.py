"""``distill serve-bench MODEL.onnx``: p99 under open-loop Poisson load, served three ways.

The same arrival schedule is served without batching, with static batching and with dynamic
batching (``distill.export.serving``); the table shows p50/p95/p99, achieved QPS, batch sizes
and whether the p99 objective holds. ``--sweep`` then searches, per strategy, the highest rate
whose p99 meets the objective, and tries a small grid of ``max_batch`` x ``max_wait_ms`` for
the dynamic batcher at that rate.

A model exported with a fixed batch axis cannot be batched: without ``--max-batch`` /
``--max-wait-ms`` it is served unbatched only, with a note; asking for batching explicitly
(``--max-batch`` > 1 or ``--max-wait-ms``) is a user error (exit 2), since the numbers would
not be the ones asked for.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from distill.errors import UserError

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 2.0
GRID_MAX_BATCH = (4, 8, 16, 32)
GRID_MAX_WAIT_MS = (1.0, 2.0, 5.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to serve")
    parser.add_argument("--qps", type=float, default=500.0, help="Poisson arrival rate")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of load per strategy (default 20)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help=f"largest batch for static/dynamic (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="dynamic: longest wait of the oldest request for a fuller batch "
                        f"(default {DEFAULT_MAX_WAIT_MS})")
    parser.add_argument("--slo-p99-ms", type=float, default=10.0, help="p99 objective (ms)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--inputs", choices=("auto", "digits", "random"), default="auto",
                        help="request samples: digits validation images (auto: when the input "
                        "is 1xSxS) or standard-normal noise")
    parser.add_argument("--seed", type=int, default=0, help="arrival schedule and input draw")
    parser.add_argument("--rounds", type=int, default=1,
                        help="cut the load into this many rounds and alternate the strategies "
                        "(fairer on a machine whose other load comes and goes)")
    parser.add_argument("--sweep", action="store_true",
                        help="find each strategy's highest QPS meeting the SLO; recommend "
                        "max_batch/max_wait_ms")
    parser.add_argument("--sweep-trial-s", type=float, default=3.0,
                        help="seconds per sweep trial (default 3; capped by --duration)")
    parser.add_argument("--sweep-steps", type=int, default=10,
                        help="most trials per strategy in the sweep (default 10)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _check_flags(args: argparse.Namespace) -> None:
    checks = (
        ("--qps", args.qps, args.qps > 0, "> 0"),
        ("--duration", args.duration, args.duration > 0, "> 0"),
        ("--slo-p99-ms", args.slo_p99_ms, args.slo_p99_ms > 0, "> 0"),
        ("--threads", args.threads, args.threads >= 1, ">= 1"),
        ("--sweep-trial-s", args.sweep_trial_s, args.sweep_trial_s > 0, "> 0"),
        ("--sweep-steps", args.sweep_steps, args.sweep_steps >= 1, ">= 1"),
        ("--rounds", args.rounds, args.rounds >= 1, ">= 1"),
    )
    for flag, value, ok, want in checks:
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise UserError(f"{flag} must be {want}; got {value}")
    if args.max_batch is not None and args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1; got {args.max_batch}")
    if args.max_wait_ms is not None and not args.max_wait_ms >= 0:
        raise UserError(f"--max-wait-ms must be >= 0; got {args.max_wait_ms}")


def _inputs(mode: str, io: Any, seed: int) -> tuple[Any, str]:
    """Request samples and where they come from: digits validation images or noise."""
    from distill.export.serving import random_inputs

    square_gray = (len(io.sample_shape) == 3 and io.sample_shape[0] == 1
                   and io.sample_shape[1] == io.sample_shape[2] and io.dtype.kind == "f")
    if mode == "digits" and not square_gray:
        raise UserError(f"--inputs digits needs a 1xSxS float input; the model takes "
                        f"{io.sample_shape} {io.dtype}")
    if mode == "random" or not square_gray:
        return random_inputs(io, seed=seed), "random normal"
    from distill.data import DigitsDataModule

    dm = DigitsDataModule(image_size=io.sample_shape[1])
    x = dm.dataset("val").tensors[0].numpy().astype(io.dtype)
    size = io.sample_shape[1]
    return x, f"digits validation split ({len(x)} images, {size}x{size})"


def search_max_rate(passes: Callable[[float], bool], start: float, max_steps: int = 10,
                    rel_tol: float = 0.05, up_first: bool = False
                    ) -> tuple[float | None, list[tuple[float, bool]]]:
    """Highest rate that passes: doubling from ``start`` to bracket it, then bisection.

    Args:
        passes: Runs a trial at a rate; ``True`` if the objective held.
        start: First rate tried.
        max_steps: Most trials in all (the search stops by itself).
        rel_tol: Stop bisecting when the bracket ``hi / lo - 1`` is this tight.
        up_first: If ``start`` fails, look *upward* (static batching fails at low rates, where
            filling a batch takes longer than the objective) instead of halving.

    Returns:
        ``(best passing rate or None, [(rate, passed), ...] in trial order)``.
    """
    trials: list[tuple[float, bool]] = []

    def probe(rate: float) -> bool:
        ok = bool(passes(rate))
        trials.append((rate, ok))
        return ok

    lo: float | None = None
    hi: float | None = None
    if probe(start):
        lo = start
    else:
        rate = start
        hi = None if up_first else start
        while lo is None and len(trials) < max_steps:
            rate = rate * 2 if up_first else rate / 2
            if probe(rate):
                lo = rate
            elif not up_first:
                hi = rate
        if lo is None:
            return None, trials
    while hi is None and len(trials) < max_steps:
        if probe(lo * 2):
            lo *= 2
        else:
            hi = lo * 2
    while hi is not None and len(trials) < max_steps and hi / lo - 1 > rel_tol:
        mid = round(math.sqrt(lo * hi), 1)  # geometric: rates span orders of magnitude
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def _sweep(session: Any, inputs: Any, args: argparse.Namespace, strategies: tuple[str, ...],
           max_batch: int, max_wait_ms: float) -> dict[str, Any]:
    from distill.export.serving import BatchingServer, run_load

    trial_s = min(args.sweep_trial_s, args.duration)

    def trial(strategy: str, rate: float, mb: int, mw: float) -> dict[str, Any]:
        server = BatchingServer(session, strategy, mb, mw)
        return run_load(server, inputs, rate, trial_s, slo_p99_ms=args.slo_p99_ms,
                        seed=args.seed)

    out: dict[str, Any] = {"trial_s": trial_s, "strategies": {}}
    for strategy in strategies:
        seen: dict[float, dict[str, Any]] = {}

        def passes(rate: float, strategy: str = strategy, seen: dict = seen) -> bool:
            seen[rate] = trial(strategy, rate, max_batch, max_wait_ms)
            return bool(seen[rate]["slo_met"])

        best, trials = search_max_rate(passes, args.qps, args.sweep_steps,
                                       up_first=strategy == "static")
        out["strategies"][strategy] = {
            "max_qps": best,
            "p99_ms_at_max": seen[best]["p99_ms"] if best is not None else None,
            "trials": [{"qps": r, "p99_ms": seen[r]["p99_ms"], "slo_met": ok}
                       for r, ok in trials],
        }
    if "dynamic" in strategies:
        out["recommendation"] = _recommend(trial, out["strategies"]["dynamic"]["max_qps"]
                                           or args.qps)
    return out


def _recommend(trial: Callable[..., dict[str, Any]], rate: float) -> dict[str, Any]:
    """Dynamic batching's grid at the highest rate found: lowest p99 that meets the SLO."""
    grid = []
    for mb in GRID_MAX_BATCH:
        for mw in GRID_MAX_WAIT_MS:
            r = trial("dynamic", rate, mb, mw)
            grid.append({"max_batch": mb, "max_wait_ms": mw, "p99_ms": r["p99_ms"],
                         "slo_met": r["slo_met"], "mean_batch": r["mean_batch"]})
    ok = [g for g in grid if g["slo_met"]]
    best = min(ok, key=lambda g: (g["p99_ms"], g["max_wait_ms"], g["max_batch"])) if ok else None
    return {"at_qps": rate, "best": best, "grid": grid}


def _hist_summary(hist: dict[int, int]) -> str:
    """Batch sizes in power-of-two buckets, as shares of batches: ``1:40% 2-3:35% ...``."""
    if not hist:
        return "-"
    total = sum(hist.values())
    buckets: dict[str, int] = {}
    for size, count in sorted(hist.items()):
        lo = 1 << (size.bit_length() - 1)
        key = str(lo) if lo == 1 else f"{lo}-{2 * lo - 1}"
        buckets[key] = buckets.get(key, 0) + count
    return " ".join(f"{k}:{100 * v / total:.0f}%" for k, v in buckets.items())


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"serve-bench {report['model']}: {report['qps']:g} qps Poisson for "
        f"{report['duration_s']:g} s ({report['rounds']} round(s)), p99 objective "
        f"{report['slo_p99_ms']:g} ms, {report['threads']} thread(s), "
        f"batch axis {report['batch_axis']}",
        f"inputs: {report['inputs_source']}",
    ]
    if report["note"]:
        lines.append(f"note: {report['note']}")
    lines.append("lag99: p99 of how late the load generator itself submitted (ms); latency is "
                 "clocked from the scheduled arrival, so a large lag99 means a busy machine")
    head = (f"{'strategy':<9}{'batch':>6}{'wait_ms':>8}{'p50_ms':>9}{'p95_ms':>9}{'p99_ms':>9}"
            f"{'qps':>9}{'done':>7}{'drop':>6}{'late':>6}{'lag99':>7}  {'SLO':<5}"
            "batches (mean; sizes)")
    lines += [head, "-" * len(head)]
    for name, r in report["strategies"].items():
        if "skipped" in r:
            lines.append(f"{name:<9}skipped: {r['skipped']}")
            continue
        slo = "met" if r["slo_met"] else "MISS"
        lines.append(
            f"{name:<9}{r['max_batch']:>6}{_fmt(r['max_wait_ms'], 1):>8}{_fmt(r['p50_ms']):>9}"
            f"{_fmt(r['p95_ms']):>9}{_fmt(r['p99_ms']):>9}{r['achieved_qps']:>9.1f}"
            f"{r['completed']:>7}{r['dropped']:>6}{r['late']:>6}"
            f"{_fmt(r['submit_lag_p99_ms'], 1):>7}  {slo:<5}"
            f"{_fmt(r['mean_batch'], 1)}; {_hist_summary(r['batch_hist'])}"
        )
    sweep = report.get("sweep")
    if sweep:
        lines.append(f"sweep: highest qps with p99 <= {report['slo_p99_ms']:g} ms "
                     f"(trials of {sweep['trial_s']:g} s)")
        for name, s in sweep["strategies"].items():
            lines.append(f"  {name:<9}{_fmt(s['max_qps'], 1):>10} qps   p99 there "
                         f"{_fmt(s['p99_ms_at_max'])} ms   ({len(s['trials'])} trials)")
        rec = sweep.get("recommendation")
        if rec and rec["best"]:
            b = rec["best"]
            lines.append(f"recommend: --max-batch {b['max_batch']} --max-wait-ms "
                         f"{b['max_wait_ms']:g} (p99 {b['p99_ms']:.2f} ms at "
                         f"{rec['at_qps']:g} qps, lowest of {len(rec['grid'])} settings)")
        elif rec:
            lines.append(f"recommend: none of {len(rec['grid'])} max_batch/max_wait_ms "
                         f"settings met the objective at {rec['at_qps']:g} qps")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    from distill.export.serving import (
        STRATEGIES,
        describe_model,
        open_session,
        serving_report,
        warmup,
    )

    session = open_session(args.model, args.threads)
    io = describe_model(session)
    explicit = (args.max_batch is not None and args.max_batch > 1) or args.max_wait_ms is not None
    if io.fixed_batch is not None and explicit:
        flag = (f"--max-batch {args.max_batch}" if args.max_batch is not None
                else f"--max-wait-ms {args.max_wait_ms:g}")
        raise UserError(f"{flag}: '{args.model}' has a fixed batch axis "
                        f"({io.fixed_batch}) and cannot be batched; re-export it with a dynamic "
                        "batch axis, or drop the batching flags to serve it unbatched")
    # a fixed-batch model: serving_report marks static/dynamic skipped, with the reason
    served = STRATEGIES if io.fixed_batch is None else ("none",)
    max_batch = args.max_batch or DEFAULT_MAX_BATCH
    max_wait_ms = DEFAULT_MAX_WAIT_MS if args.max_wait_ms is None else args.max_wait_ms
    inputs, source = _inputs(args.inputs, io, args.seed)
    if args.sweep:  # the grid reaches past the user's max_batch: warm those shapes too
        warmup(session, max(max_batch, *GRID_MAX_BATCH))
    report = serving_report(args.model, args.qps, args.duration, args.slo_p99_ms, max_batch,
                            max_wait_ms, args.threads, inputs=inputs, strategies=STRATEGIES,
                            seed=args.seed, rounds=args.rounds, session=session)
    report["inputs_source"] = source
    if args.sweep:
        report["sweep"] = _sweep(session, inputs, args, served, max_batch, max_wait_ms)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0
