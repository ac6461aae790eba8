"""Latency of an ONNX file in ONNX Runtime (and of a PyTorch module, for comparison).

:func:`measure_latency` times ``session.run`` one call at a time, after a warm-up, and reports
percentiles (p50/p90/p95/p99), mean, standard deviation, coefficient of variation and
throughput per batch size. Thread counts are always explicit: ONNX Runtime's defaults use
every core, which makes numbers depend on whatever else runs on the machine.

This module imports neither torch nor Lightning at import time, so ``distill bench`` and a
child process started by ``subprocess=True`` stay light.

Example:
    >>> stats = measure_latency("student.onnx", batch_sizes=(1, 8), threads=1)
    >>> stats[1]["p99_ms"], stats[8]["throughput_qps"]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import UserError

from .onnx import PROVIDERS, _fixed_batch, load_session, session_input

__all__ = ["PROVIDERS", "load_session", "make_feed", "measure_latency", "measure_torch_latency",
           "profile_ops", "summarize"]

# --------------------------------------------------------------------------- inputs


def make_feed(
    session: Any, batch_size: int, inputs: Any = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs for one batch: ``inputs`` repeated / cut to ``batch_size``, or random normals.

    Raises:
        UserError: the model has a fixed batch other than ``batch_size``, or a symbolic
            dimension besides the batch and no ``inputs`` to take its size from.
    """
    rng = np.random.default_rng(seed)
    given: Mapping[str, Any] = {}
    if inputs is not None:
        given = inputs if isinstance(inputs, Mapping) else {session.get_inputs()[0].name: inputs}
    feed = {}
    for i in range(len(session.get_inputs())):
        name, shape, dtype = session_input(session, i)
        fixed = _fixed_batch(shape)
        if fixed is not None and fixed != batch_size:
            raise UserError(
                f"input '{name}' has a fixed batch of {fixed}; cannot time batch {batch_size} "
                "(export with a dynamic batch)"
            )
        if name in given:
            arr = np.asarray(given[name], dtype=dtype)
            feed[name] = np.ascontiguousarray(np.take(arr, np.arange(batch_size) % len(arr), 0))
            continue
        rest = shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in rest):
            raise UserError(
                f"input '{name}' has symbolic dimensions {shape}; pass example inputs"
            )
        full = (batch_size, *rest)
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.standard_normal(full).astype(dtype)
        else:
            feed[name] = np.zeros(full, dtype=dtype)
    return feed


# --------------------------------------------------------------------------- statistics


def summarize(times_ms: Sequence[float], batch_size: int) -> dict[str, float | int]:
    """Latency statistics of per-call times in milliseconds.

    ``cv`` is the coefficient of variation std/mean (noise: above ~0.2 the percentiles are
    not to be trusted); ``throughput_qps`` is samples per second at one call at a time,
    ``batch_size * 1000 / mean_ms``.
    """
    a = np.asarray(times_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("summarize needs at least one timing")
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {
        "batch_size": int(batch_size),
        "iters": int(a.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": mean,
        "std_ms": std,
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "cv": std / mean if mean > 0 else 0.0,
        "throughput_qps": batch_size * 1000.0 / mean if mean > 0 else 0.0,
    }


def _time_calls(
    call: Any, warmup: int, iters: int, time_budget_s: float | None
) -> list[float]:
    """Per-call wall times (ms) of ``call()``; stops early once ``time_budget_s`` is spent."""
    for _ in range(warmup):
        call()
    deadline = time.perf_counter() + time_budget_s if time_budget_s else float("inf")
    floor = min(iters, 10)  # never fewer than this many samples, whatever the budget
    times: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(iters):
        start = clock()
        call()
        times.append((clock() - start) / 1e6)
        if len(times) >= floor and time.perf_counter() > deadline:
            break
    return times


# --------------------------------------------------------------------------- memory


class _MemoryProbe:
    """Peak resident memory of this process above the level at creation, in MiB.

    On Linux the kernel's high-water mark (``VmHWM``) is reset by writing 5 to
    ``/proc/self/clear_refs``; the peak is then read back after the work (``source`` is
    ``rss_peak_delta``). Where that is impossible, the RSS after the work minus the RSS before
    (``rss_delta``, a lower bound of the peak). In a training process the value includes any
    allocation made meanwhile by other threads: ``subprocess=True`` isolates it.
    """

    def __init__(self) -> None:
        self.before = self._status("VmRSS")
        self.source: str | None = None
        if self.before is None:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.source = "rss_peak_delta"
        except OSError:
            self.source = "rss_delta"

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024.0  # kB -> MiB
        except OSError:
            return None
        return None

    def peak_mb(self) -> float | None:
        if self.before is None:
            return None
        now = self._status("VmHWM" if self.source == "rss_peak_delta" else "VmRSS")
        return None if now is None else max(0.0, now - self.before)


# --------------------------------------------------------------------------- profiling


def profile_ops(
    onnx_path: str | os.PathLike,
    feed: dict[str, np.ndarray],
    provider: str = "cpu",
    threads: int = 1,
    inter_threads: int = 1,
    iters: int = 50,
    top: int = 10,
) -> list[dict[str, Any]]:
    """Time per operator type from ONNX Runtime's profiler, most expensive first.

    A separate, profiled session is used so that profiling overhead never enters the latency
    numbers. The profile JSON (Chrome trace format) is parsed and deleted.

    Returns:
        ``[{op_type, total_ms, mean_ms, count, share}]`` where ``mean_ms`` is per run and
        ``share`` is the fraction of all kernel time, for the ``top`` operator types.
    """
    with tempfile.TemporaryDirectory(prefix="distill_prof_") as tmp:
        session = load_session(onnx_path, provider, threads, inter_threads, f"{tmp}/ort")
        for _ in range(iters + 3):  # 3 warm-up runs, kept out of the totals below
            session.run(None, feed)
        profile_file = session.end_profiling()
        events = json.loads(Path(profile_file).read_text())
        Path(profile_file).unlink(missing_ok=True)
    per_op: dict[str, list[float]] = {}
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    skip_before = runs[3]["ts"] if len(runs) > 3 else 0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event.get("ts", 0) < skip_before:
            continue
        op = event.get("args", {}).get("op_name", "?")
        per_op.setdefault(op, []).append(event.get("dur", 0) / 1000.0)
    total = sum(sum(v) for v in per_op.values()) or 1.0
    rows = [
        {"op_type": op, "total_ms": sum(v), "mean_ms": sum(v) / max(iters, 1),
         "count": len(v), "share": sum(v) / total}
        for op, v in per_op.items()
    ]
    return sorted(rows, key=lambda r: r["total_ms"], reverse=True)[:top]


# --------------------------------------------------------------------------- entry points


def _check_args(
    batch_sizes: Sequence[int], warmup: int, iters: int, time_budget_s: float | None
) -> list[int]:
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes) or any(b != v for b, v in zip(sizes, batch_sizes)):
        raise UserError(f"batch sizes must be integers >= 1; got {list(batch_sizes)}")
    if int(iters) < 1:
        raise UserError(f"'iters' must be >= 1; got {iters}")
    if int(warmup) < 0:
        raise UserError(f"'warmup' must be >= 0; got {warmup}")
    if time_budget_s is not None and time_budget_s <= 0:
        raise UserError(f"'time_budget_s' must be > 0; got {time_budget_s}")
    return sizes


def measure_latency(
    onnx_path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1,),
    provider: str = "cpu",
    threads: int = 1,
    inter_threads: int = 1,
    warmup: int = 20,
    iters: int = 200,
    time_budget_s: float | None = None,
    inputs: Any = None,
    subprocess: bool = False,
    profile: bool = False,
    seed: int = 0,
) -> dict[int, dict[str, Any]]:
    """Latency of an ONNX file in ONNX Runtime, per batch size.

    Each batch size is timed with one session: ``warmup`` untimed calls, then up to ``iters``
    timed ``session.run`` calls, one at a time (fewer when ``time_budget_s`` runs out first,
    but at least 10).

    Args:
        onnx_path: The model.
        batch_sizes: Batch sizes to time (the model needs a dynamic batch for sizes other
            than its fixed one).
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (ORT execution providers).
        threads: ``intra_op_num_threads``.
        inter_threads: ``inter_op_num_threads``.
        warmup: Untimed calls before timing.
        iters: Timed calls (upper bound with ``time_budget_s``).
        time_budget_s: Optional wall-clock budget of the timed loop per batch size.
        inputs: Optional example input (array, or dict name -> array), repeated or cut to
            each batch size; default random normals of the model's input shape.
        subprocess: Measure in a fresh child Python process (no threads shared with the
            caller: a training loop, its data loaders) so they don't disturb the timing.
        profile: Add ``profile``: the top operator types by time (see :func:`profile_ops`).
        seed: Seed of the random inputs.

    Returns:
        ``{batch_size: stats}``; stats are :func:`summarize`'s keys plus ``provider``,
        ``execution_provider``, ``threads``, ``inter_threads``, ``warmup``, ``peak_mem_mb``
        (peak RSS of the process above its level before the session was created, cumulative
        over the batch sizes timed so far; in a fresh child process it includes ONNX Runtime's
        one-time set-up), ``mem_source`` (see ``_MemoryProbe``) and ``onnxruntime``.

    Raises:
        UserError: a missing / non-ONNX file, an unknown or unavailable provider, bad batch
            sizes / iteration counts, or a batch size a fixed-batch model cannot take.
    """
    kwargs = dict(
        onnx_path=str(onnx_path), batch_sizes=_check_args(batch_sizes, warmup, iters,
                                                          time_budget_s),
        provider=provider, threads=threads, inter_threads=inter_threads, warmup=int(warmup),
        iters=int(iters), time_budget_s=time_budget_s, inputs=inputs, profile=profile,
        seed=seed,
    )
    if not subprocess:
        return _measure(**kwargs)
    return _measure_in_child(kwargs)


def _measure_in_child(kwargs: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Run :func:`_measure` in a fresh interpreter and return its result (or its exception).

    Like multiprocessing's ``spawn`` start method, the child is a new process that shares no
    threads with the caller; unlike it, the caller's ``__main__`` is not re-imported (that
    would re-run a training script without a ``__main__`` guard). Arguments and the result
    travel as pickles in a private temporary folder.
    """
    import pickle
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="distill_lat_") as tmp:
        args_file, out_file = Path(tmp, "args.pkl"), Path(tmp, "out.pkl")
        args_file.write_bytes(pickle.dumps(kwargs))
        code = (
            "import sys; from distill.export.latency import _child_main; "
            "_child_main(*sys.argv[1:])"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(args_file), str(out_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        if not out_file.exists():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(
                f"latency child process failed (exit {proc.returncode}): {tail[0]}"
            )
        status, value = pickle.loads(out_file.read_bytes())
    if status == "error":
        raise value
    return value


def _child_main(args_file: str, out_file: str) -> None:
    """Entry point of the child process started by :func:`_measure_in_child`."""
    import pickle

    kwargs = pickle.loads(Path(args_file).read_bytes())
    try:
        result: tuple[str, Any] = ("ok", _measure(**kwargs))
    except Exception as exc:  # handed back to the parent, which re-raises it
        result = ("error", exc)
    Path(out_file).write_bytes(pickle.dumps(result))


def _measure(
    onnx_path: str,
    batch_sizes: list[int],
    provider: str,
    threads: int,
    inter_threads: int,
    warmup: int,
    iters: int,
    time_budget_s: float | None,
    inputs: Any,
    profile: bool,
    seed: int,
) -> dict[int, dict[str, Any]]:
    import onnxruntime as ort

    probe = _MemoryProbe()
    session = load_session(onnx_path, provider, threads, inter_threads)
    outputs = [o.name for o in session.get_outputs()]
    results: dict[int, dict[str, Any]] = {}
    for b in batch_sizes:
        feed = make_feed(session, b, inputs, seed)
        times = _time_calls(lambda feed=feed: session.run(outputs, feed), warmup, iters,
                            time_budget_s)
        stats: dict[str, Any] = summarize(times, b)
        stats.update(
            provider=provider, execution_provider=session.get_providers()[0],
            threads=threads, inter_threads=inter_threads, warmup=warmup,
            peak_mem_mb=probe.peak_mb(), mem_source=probe.source,
            onnxruntime=ort.__version__,
        )
        if profile:
            stats["profile"] = profile_ops(onnx_path, feed, provider, threads, inter_threads,
                                           iters=min(iters, 50))
        results[b] = stats
    return results


def measure_torch_latency(
    model: Any,
    example: Any,
    device: str = "cpu",
    compile: bool = False,
    warmup: int = 20,
    iters: int = 200,
    threads: int | None = None,
) -> dict[str, Any]:
    """Latency of a PyTorch module (eval mode, ``inference_mode``) on one example batch.

    On CUDA each call is timed with a pair of CUDA events (kernel time on the stream, no host
    sync inside the timed span); on the CPU with ``perf_counter``. The module's train/eval
    modes and torch's thread count are restored afterwards.

    Args:
        model: The module.
        example: One input batch; its first dimension is the batch size.
        device: ``cpu`` or ``cuda[:i]``; the module is moved there for the measurement.
        compile: Time ``torch.compile(model)`` (compilation happens during warm-up).
        warmup: Untimed calls.
        iters: Timed calls.
        threads: ``torch.set_num_threads`` for the measurement (CPU); None keeps the current.

    Returns:
        :func:`summarize`'s keys plus ``provider`` (``torch-cpu`` / ``torch-cuda``),
        ``threads`` and ``compile``.
    """
    import torch

    from .onnx import eval_mode

    _check_args([1], warmup, iters, None)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but torch.cuda.is_available() is False")
    old_threads = torch.get_num_threads()
    param = next(model.parameters(), None)
    old_device = param.device if param is not None else None
    model.to(dev)
    x = example.to(dev)
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        with eval_mode(model), torch.inference_mode():
            fn = torch.compile(model) if compile else model
            if dev.type == "cuda":
                times = _cuda_times(torch, fn, x, warmup, iters)
            else:
                times = _time_calls(lambda: fn(x), warmup, iters, None)
    finally:
        torch.set_num_threads(old_threads)
        if old_device is not None:
            model.to(old_device)
    stats: dict[str, Any] = summarize(times, int(x.shape[0]))
    stats.update(provider=f"torch-{dev.type}", threads=torch.get_num_threads(),
                 compile=compile)
    return stats


def _cuda_times(torch: Any, fn: Any, x: Any, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    pairs = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]
