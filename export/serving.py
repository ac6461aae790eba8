"""Serving check: in-process batching over ONNX Runtime, measured under open-loop Poisson load.

A latency benchmark runs one request at a time; a server does not. Requests arrive at random
and queue while the model is busy, so the p99 a user sees is queueing + batching + inference.
This module serves one ONNX Runtime session with one worker thread under three strategies:

- ``none``: every request runs alone (batch 1), first in, first out.
- ``static``: the worker waits for exactly ``max_batch`` requests; a partial batch is flushed
  only when the server closes (the end of a load test).
- ``dynamic``: the worker runs a batch as soon as ``max_batch`` requests wait *or* the oldest
  has waited ``max_wait_ms`` (the policy of Triton's dynamic batcher and TF Serving's
  ``batch_timeout_micros``). Under light load a request waits at most ``max_wait_ms``; under
  heavy load batches fill up and one run serves many requests.

``run_load`` is an open-loop generator: it submits on a Poisson schedule whatever the server
does, and clocks each request from its *scheduled* arrival, so a server that falls behind is
charged for the queue it builds (no coordinated omission). ``serving_report`` measures the three
strategies side by side on the same arrival schedule.

A model whose batch axis is fixed cannot be batched: it is served with strategy ``none`` only
(``BatchingServer`` refuses the others with a ``UserError``; ``serving_report`` marks them
skipped with the reason).

Example:
    >>> report = serving_report("student.onnx", qps=500, duration_s=5, slo_p99_ms=10,
    ...                         max_batch=16, max_wait_ms=2)            # doctest: +SKIP
    >>> report["strategies"]["dynamic"]["p99_ms"]                         # doctest: +SKIP
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from distill.errors import UserError

STRATEGIES: tuple[str, ...] = ("none", "static", "dynamic")

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def open_session(path: str | os.PathLike, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with explicit thread counts (what a serving replica gets).

    ``intra_op_num_threads=threads`` and one inter-op thread (``latency.load_session``): left
    at ORT's default (all cores) the numbers would depend on the machine, not on the model.

    Raises:
        UserError: the file is missing or ONNX Runtime cannot load it, or ``threads < 1``.
    """
    from distill.export.latency import load_session

    return load_session(path, provider="cpu", threads=threads, inter_threads=1)


@dataclass(frozen=True)
class ModelIO:
    """What a server needs to know about a session's input and outputs.

    Attributes:
        input_name: The single input's name.
        sample_shape: One sample's shape (the input shape without the batch axis).
        dtype: The input's numpy dtype.
        fixed_batch: ``None`` if the batch axis is dynamic, else its fixed size.
        output_names: Names of the outputs (each is split along axis 0).
    """

    input_name: str
    sample_shape: tuple[int, ...]
    dtype: np.dtype
    fixed_batch: int | None
    output_names: tuple[str, ...]

    @property
    def batch_axis(self) -> str:
        return "dynamic" if self.fixed_batch is None else f"fixed at {self.fixed_batch}"


def describe_model(session: ort.InferenceSession) -> ModelIO:
    """Read the input/output signature; a batch axis is dynamic when dim 0 is symbolic.

    Raises:
        UserError: more than one input, an input without a batch axis, symbolic dimensions
            other than the batch axis, or an unsupported input type.
    """
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise UserError(f"serving supports models with one input; this one has {len(inputs)}: "
                        f"{names}")
    inp = inputs[0]
    shape = list(inp.shape)
    if not shape:
        raise UserError(f"model input '{inp.name}' is a scalar: it has no batch axis")
    rest = shape[1:]
    if any(not isinstance(d, int) for d in rest):
        raise UserError(f"model input '{inp.name}' has symbolic dimensions besides the batch "
                        f"axis: {shape}; re-export it with a fixed sample shape")
    if inp.type not in _ORT_DTYPES:
        raise UserError(f"model input '{inp.name}' has unsupported type {inp.type}")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return ModelIO(
        input_name=inp.name,
        sample_shape=tuple(int(d) for d in rest),
        dtype=np.dtype(_ORT_DTYPES[inp.type]),
        fixed_batch=batch,
        output_names=tuple(o.name for o in session.get_outputs()),
    )


def warmup(session: ort.InferenceSession, max_batch: int = 1, rounds: int = 2) -> None:
    """Run every batch size up to ``max_batch`` so first-shape allocations stay out of the data.

    Raises:
        UserError: an output whose first axis does not follow the batch size (it cannot be
            split back to the callers).
    """
    io = describe_model(session)
    sizes = [io.fixed_batch] if io.fixed_batch is not None else range(1, max_batch + 1)
    for _ in range(rounds):
        for b in sizes:
            outs = session.run(None, {io.input_name: np.zeros((b, *io.sample_shape), io.dtype)})
            for name, out in zip(io.output_names, outs):
                if np.ndim(out) == 0 or out.shape[0] != b:
                    raise UserError(f"model output '{name}' has shape {np.shape(out)} for a batch "
                                    f"of {b}: it has no batch axis to split per request")


def batch_ready(strategy: str, waiting: int, oldest_wait_s: float, max_batch: int,
                max_wait_s: float, closing: bool) -> bool:
    """Whether the worker should run a batch now (the batching policy, free of threads).

    Args:
        strategy: ``none``, ``static`` or ``dynamic``.
        waiting: Requests in the queue.
        oldest_wait_s: How long the oldest of them has waited.
        max_batch: Largest batch (``none`` uses 1).
        max_wait_s: ``dynamic`` only: longest time the oldest request may wait for company.
        closing: The server is closing: whatever waits is flushed.
    """
    if waiting <= 0:
        return False
    if strategy == "none" or closing:
        return True
    if waiting >= max_batch:
        return True
    return strategy == "dynamic" and oldest_wait_s >= max_wait_s


@dataclass
class _Request:
    sample: np.ndarray
    future: cf.Future
    t_enqueued: float


class BatchingServer:
    """One worker thread that serves an ONNX Runtime session under a batching strategy.

    ``submit`` takes one sample (no batch axis) and returns a ``concurrent.futures.Future``
    whose result is that sample's output row (a tuple of rows when the model has several
    outputs). Thread-safe: any number of threads may submit.

    Args:
        session: An ONNX Runtime session with one input whose axis 0 is the batch.
        strategy: ``none`` (batch 1, FIFO), ``static`` (exactly ``max_batch``; partial batch
            only at close) or ``dynamic`` (``max_batch`` or ``max_wait_ms``, whichever first).
        max_batch: Largest batch the worker forms.
        max_wait_ms: ``dynamic``: longest time the oldest request waits for a fuller batch.

    Raises:
        UserError: unknown strategy, ``max_batch < 1``, ``max_wait_ms < 0``, or a batching
            strategy for a model whose batch axis is fixed.

    Example:
        >>> with BatchingServer(session, "dynamic", max_batch=8, max_wait_ms=2) as server:
        ...     logits = server.submit(image).result()                # doctest: +SKIP
    """

    def __init__(self, session: ort.InferenceSession, strategy: str = "dynamic",
                 max_batch: int = 16, max_wait_ms: float = 2.0) -> None:
        if strategy not in STRATEGIES:
            raise UserError(f"strategy must be one of {', '.join(STRATEGIES)}; got '{strategy}'")
        if max_batch < 1:
            raise UserError(f"max_batch must be >= 1; got {max_batch}")
        if max_wait_ms < 0:
            raise UserError(f"max_wait_ms must be >= 0; got {max_wait_ms}")
        self.io = describe_model(session)
        if self.io.fixed_batch is not None and strategy != "none":
            raise UserError(
                f"model input '{self.io.input_name}' has a fixed batch axis "
                f"({self.io.fixed_batch}): it cannot be batched with strategy '{strategy}'; "
                "serve it with strategy 'none' or re-export it with a dynamic batch axis"
            )
        self.session = session
        self.strategy = strategy
        self.max_batch = 1 if strategy == "none" else int(max_batch)
        self.max_wait_ms = float(max_wait_ms) if strategy == "dynamic" else 0.0
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._batch_sizes: list[int] = []
        self._worker = threading.Thread(target=self._serve, name=f"serve-{strategy}",
                                        daemon=True)
        self._worker.start()

    # -- client side --------------------------------------------------------------------------
    def submit(self, sample: np.ndarray,
               on_done: Callable[[cf.Future], Any] | None = None) -> cf.Future:
        """Queue one sample; ``on_done`` is attached before the worker can see the request.

        Raises:
            ValueError: the sample's shape is not the model's sample shape.
            RuntimeError: the server is closed.
        """
        sample = np.array(sample, dtype=self.io.dtype)  # a copy: the caller may reuse its buffer
        if sample.shape != self.io.sample_shape:
            raise ValueError(f"sample shape {sample.shape} != the model's sample shape "
                             f"{self.io.sample_shape} (submit one sample, without a batch axis)")
        future: cf.Future = cf.Future()
        if on_done is not None:
            future.add_done_callback(on_done)
        with self._cond:
            if self._closing:
                raise RuntimeError("submit() on a closed BatchingServer")
            self._queue.append(_Request(sample, future, time.perf_counter()))
            self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> int:
        """Stop accepting requests, flush the queue, and stop the worker.

        Args:
            timeout: Seconds to let the queue drain (``None``: until empty); requests still
                queued then are cancelled. ``0`` cancels everything queued at once. A batch
                already running always completes.

        Returns:
            How many queued requests were cancelled.
        """
        drain = timeout is None or timeout > 0
        with self._cond:
            self._closing = True
            cancelled = 0 if drain else self._cancel_queued()
            self._cond.notify_all()
        if drain:
            self._worker.join(timeout)
            with self._cond:
                cancelled = self._cancel_queued()
                self._cond.notify_all()
        self._worker.join()
        return cancelled

    def _cancel_queued(self) -> int:
        cancelled = 0
        while self._queue:
            cancelled += int(self._queue.popleft().future.cancel())
        return cancelled

    def __enter__(self) -> BatchingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def settings(self) -> dict[str, Any]:
        """The effective policy: strategy, max_batch (1 for ``none``), max_wait_ms."""
        return {"strategy": self.strategy, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_ms if self.strategy == "dynamic" else None}

    @property
    def batch_sizes(self) -> list[int]:
        """Size of every batch run so far, in order."""
        with self._cond:
            return list(self._batch_sizes)

    # -- worker side --------------------------------------------------------------------------
    def _next_batch(self) -> list[_Request] | None:
        """Block until the policy says run; ``None`` once closing with an empty queue."""
        max_wait_s = self.max_wait_ms / 1000.0
        with self._cond:
            while True:
                age = time.perf_counter() - self._queue[0].t_enqueued if self._queue else 0.0
                if batch_ready(self.strategy, len(self._queue), age, self.max_batch,
                               max_wait_s, self._closing):
                    n = min(len(self._queue), self.max_batch)
                    return [self._queue.popleft() for _ in range(n)]
                if self._closing and not self._queue:
                    return None
                # dynamic: wake when the oldest request's wait runs out; else on submit/close
                timeout = None
                if self.strategy == "dynamic" and self._queue:
                    timeout = max(max_wait_s - age, 0.0)
                self._cond.wait(timeout)

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if live:
                self._run(live)

    def _run(self, live: list[_Request]) -> None:
        x = np.stack([r.sample for r in live])
        if self.io.fixed_batch is not None and len(live) < self.io.fixed_batch:
            # a fixed batch > 1 served unbatched: pad with zeros, keep the real rows
            pad = np.zeros((self.io.fixed_batch - len(live), *x.shape[1:]), x.dtype)
            x = np.concatenate([x, pad])
        try:
            outs = self.session.run(None, {self.io.input_name: x})
        except Exception as exc:  # the callers get the error; the server keeps serving
            for r in live:
                r.future.set_exception(exc)
            return
        with self._cond:
            self._batch_sizes.append(len(live))
        single = len(outs) == 1
        for i, r in enumerate(live):
            r.future.set_result(outs[0][i] if single else tuple(o[i] for o in outs))


def poisson_schedule(qps: float, duration_s: float, max_requests: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """Arrival times (seconds from start) of a Poisson process at ``qps``, given its count.

    ``n = min(round(qps * duration_s), max_requests)`` arrivals placed as sorted uniform
    draws on ``[0, n / qps)``: conditioned on its count, a homogeneous Poisson process's
    arrival times are exactly the order statistics of uniforms, so the gaps are Poisson-like
    (nearly exponential) while the offered rate is exactly ``qps`` rather than a noisy draw.
    """
    n = max(int(round(qps * duration_s)), 1)
    if max_requests is not None:
        n = min(n, int(max_requests))
    rng = np.random.default_rng(seed)
    return np.sort(rng.uniform(0.0, n / qps, size=n))


def _percentiles_ms(lat_s: np.ndarray) -> dict[str, float | None]:
    if lat_s.size == 0:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ms = lat_s * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
            "p99_ms": round(float(p99), 3), "mean_ms": round(float(ms.mean()), 3),
            "max_ms": round(float(ms.max()), 3)}


def _stamp(done: np.ndarray, i: int, future: cf.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        done[i] = time.perf_counter()


@dataclass
class LoadTrace:
    """One load run's raw measurements, before percentiles (traces of several runs merge).

    Attributes:
        latency_s: End-to-end latency of each completed request.
        lag_s: How late the generator submitted each request (its own scheduling noise).
        batch_sizes: Size of every batch the server ran.
        submitted: Requests sent.
        dropped: Requests cancelled at the drain deadline.
        failed: Requests whose batch raised.
        window_s: Length of the arrival schedule.
        span_s: From the start to the last result (or the window if nothing completed).
    """

    latency_s: np.ndarray
    lag_s: np.ndarray
    batch_sizes: list[int]
    submitted: int
    dropped: int
    failed: int
    window_s: float
    span_s: float


def drive(server: BatchingServer, inputs: np.ndarray, qps: float, duration_s: float, *,
          max_requests: int | None = None, drain_s: float | None = None,
          seed: int = 0) -> LoadTrace:
    """Drive ``server`` with open-loop Poisson arrivals, then close it (see ``run_load``)."""
    if qps <= 0:
        raise UserError(f"qps must be > 0; got {qps}")
    if duration_s <= 0:
        raise UserError(f"duration_s must be > 0; got {duration_s}")
    inputs = np.asarray(inputs)
    if inputs.ndim < 1 or inputs.shape[1:] != server.io.sample_shape or len(inputs) == 0:
        raise UserError(f"inputs must have shape (N, {', '.join(map(str, server.io.sample_shape))})"
                        f"; got {inputs.shape}")
    if max_requests is not None and max_requests < 1:
        raise UserError(f"max_requests must be >= 1; got {max_requests}")
    drain_s = min(duration_s, 5.0) if drain_s is None else drain_s
    if drain_s < 0:
        raise UserError(f"drain_s must be >= 0; got {drain_s}")
    arrivals = poisson_schedule(qps, duration_s, max_requests, seed)
    t0, futures, done, lag = _submit_on_schedule(server, inputs, arrivals, seed)
    # closing flushes what waits (static's partial batch) and cancels what the drain misses;
    # the drain runs from the last submission, so a generator running late drops nothing
    dropped = server.close(timeout=drain_s)
    ok = ~np.isnan(done)
    window = float(len(arrivals) / qps)
    return LoadTrace(
        latency_s=done[ok] - (t0 + arrivals[ok]),
        lag_s=lag,
        batch_sizes=server.batch_sizes,
        submitted=len(arrivals),
        dropped=int(dropped),
        failed=sum(1 for f in futures if not f.cancelled() and f.exception() is not None),
        window_s=window,
        span_s=float(np.nanmax(done) - t0) if ok.any() else window,
    )


def _submit_on_schedule(server: BatchingServer, inputs: np.ndarray, arrivals: np.ndarray,
                        seed: int) -> tuple[float, list[cf.Future], np.ndarray, np.ndarray]:
    """Submit request ``i`` at ``t0 + arrivals[i]`` (never waiting on results: open loop).

    Returns ``(t0, futures, done, lag)``: ``done[i]`` is the completion time (NaN if the
    request was cancelled or failed), ``lag[i]`` how late the generator submitted it.
    """
    n = len(arrivals)
    picks = np.random.default_rng(seed + 1).integers(0, len(inputs), size=n)
    done = np.full(n, np.nan)
    lag = np.zeros(n)
    futures: list[cf.Future] = []
    t0 = time.perf_counter() + 0.002
    for i, a in enumerate(arrivals):
        target = t0 + a
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        lag[i] = time.perf_counter() - target
        futures.append(server.submit(inputs[picks[i]], on_done=functools.partial(_stamp, done, i)))
    return t0, futures, done, lag


def summarize(traces: Sequence[LoadTrace], settings: dict[str, Any], qps: float,
              slo_p99_ms: float | None) -> dict[str, Any]:
    """Percentiles, rates and batch sizes over traces of one server setup (``settings``).

    ``achieved_qps`` is completed requests per second of schedule (a run's span counts when
    its last result comes after its schedule ends: an overloaded server is slower than the
    offered rate). ``slo_met`` requires ``p99 <= slo_p99_ms`` and nothing dropped or failed.
    """
    latency = np.concatenate([t.latency_s for t in traces])
    sizes = [b for t in traces for b in t.batch_sizes]
    dropped = sum(t.dropped for t in traces)
    failed = sum(t.failed for t in traces)
    stats = _percentiles_ms(latency)
    late = slo_met = None
    if slo_p99_ms is not None:
        late = int((latency * 1000.0 > slo_p99_ms).sum())
        slo_met = bool(stats["p99_ms"] is not None and stats["p99_ms"] <= slo_p99_ms
                       and dropped == 0 and failed == 0)
    return {
        **settings,
        "target_qps": float(qps),
        "achieved_qps": round(len(latency) / sum(max(t.window_s, t.span_s) for t in traces), 2),
        "submitted": sum(t.submitted for t in traces),
        "completed": int(len(latency)),
        "dropped": dropped,
        "failed": failed,
        "late": late,
        **stats,
        "slo_p99_ms": slo_p99_ms,
        "slo_met": slo_met,
        "batch_hist": dict(sorted(collections.Counter(sizes).items())),
        "batches": len(sizes),
        "mean_batch": round(float(np.mean(sizes)), 3) if sizes else None,
        "submit_lag_p99_ms": round(
            float(np.percentile(np.concatenate([t.lag_s for t in traces]), 99) * 1000.0), 3),
        "rounds": len(traces),
    }


def run_load(server: BatchingServer, inputs: np.ndarray, qps: float, duration_s: float, *,
             slo_p99_ms: float | None = None, max_requests: int | None = None,
             drain_s: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Drive ``server`` with open-loop Poisson arrivals, then close it; return the measurements.

    Requests are submitted on schedule whatever the server does; each is clocked from its
    scheduled arrival to its result (queue + batch wait + inference). After the last arrival
    is submitted the server gets ``drain_s`` (default ``min(duration_s, 5)``) to finish; those
    queued then are cancelled and counted as dropped (``drain_s=0`` drops whatever waits).
    Total time: the schedule (plus the generator's own lag, reported), then at most
    ``drain_s``, plus the batch running at the deadline.

    Args:
        server: A server; it is closed at the end (the static strategy flushes its partial batch).
        inputs: ``(N, *sample_shape)`` samples; request ``i`` draws one at random.
        qps: Target arrival rate.
        duration_s: Length of the arrival schedule.
        slo_p99_ms: The latency objective; ``late`` counts completed requests over it and
            ``slo_met`` requires ``p99 <= slo`` with nothing dropped or failed.
        max_requests: Cap on the number of requests.
        drain_s: Grace time after the last arrival.
        seed: Seeds the schedule and the input draw (same seed, same load for every strategy).

    Returns:
        ``summarize``'s dict: strategy, max_batch, max_wait_ms, target_qps, achieved_qps,
        submitted, completed, dropped, failed, late, p50/p95/p99/mean/max_ms, slo_p99_ms,
        slo_met, batch_hist ({size: count}), batches, mean_batch, submit_lag_p99_ms (how late
        the generator itself submitted), rounds; plus wall_s.
    """
    start = time.perf_counter()
    trace = drive(server, inputs, qps, duration_s, max_requests=max_requests, drain_s=drain_s,
                  seed=seed)
    return {**summarize([trace], server.settings, qps, slo_p99_ms),
            "wall_s": round(time.perf_counter() - start, 3)}


def random_inputs(io: ModelIO, n: int = 256, seed: int = 0) -> np.ndarray:
    """``n`` standard-normal samples of the model's sample shape (when no real data is given)."""
    if io.dtype.kind != "f":
        raise UserError(f"cannot draw random inputs for input type {io.dtype}; pass real inputs")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *io.sample_shape)).astype(io.dtype)


def check_load_args(qps: float, duration_s: float, slo_p99_ms: float, max_batch: int,
                    max_wait_ms: float, threads: int) -> None:
    """Range checks of ``serving_report``'s arguments (the CLI checks its flags by name).

    Raises:
        UserError: naming the first argument out of range.
    """
    for name, value, ok, want in (
        ("qps", qps, qps > 0, "> 0"), ("duration_s", duration_s, duration_s > 0, "> 0"),
        ("slo_p99_ms", slo_p99_ms, slo_p99_ms > 0, "> 0"),
        ("max_batch", max_batch, max_batch >= 1, ">= 1"),
        ("max_wait_ms", max_wait_ms, max_wait_ms >= 0, ">= 0"),
        ("threads", threads, threads >= 1, ">= 1"),
    ):
        if not ok:
            raise UserError(f"{name} must be {want}; got {value}")


def serving_report(onnx_path: str | os.PathLike, qps: float, duration_s: float,
                   slo_p99_ms: float, max_batch: int, max_wait_ms: float, threads: int = 1, *,
                   inputs: np.ndarray | None = None, strategies: Sequence[str] = STRATEGIES,
                   max_requests: int | None = None, seed: int = 0, rounds: int = 1,
                   session: ort.InferenceSession | None = None) -> dict[str, Any]:
    """Measure the serving strategies side by side on one model under the same Poisson load.

    Every strategy gets the same arrival schedule and inputs, on one session with ``threads``
    intra-op threads. With ``rounds > 1`` the load is cut into ``rounds`` parts of
    ``duration_s / rounds`` and the strategies take turns (none, static, dynamic, none, ...),
    round ``r`` using schedule seed ``seed + r`` for all: on a machine whose other load comes
    and goes, every strategy then sees the same mix of quiet and busy spells.

    Args:
        onnx_path: The model.
        qps: Arrival rate.
        duration_s: Seconds of load per strategy.
        slo_p99_ms: The p99 objective.
        max_batch: Largest batch for ``static`` and ``dynamic``.
        max_wait_ms: ``dynamic``'s longest wait for a fuller batch.
        threads: ONNX Runtime intra-op threads.
        inputs: ``(N, *sample_shape)`` samples (real validation data if you have it); default
            256 standard-normal samples.
        strategies: Which strategies to measure.
        max_requests: Cap on requests per strategy and round.
        seed: Arrival schedule and input draw.
        rounds: Interleaved rounds per strategy (each restarts with an empty queue: keep
            rounds long enough for an overloaded queue to show, a few seconds).
        session: An already open session for ``onnx_path`` (skips loading).

    Returns:
        ``{"model", "batch_axis", "input", "threads", "qps", "duration_s", "rounds",
        "slo_p99_ms", "max_batch", "max_wait_ms", "onnxruntime", "cpu_count", "note",
        "strategies": {name: summarize's dict over the rounds, or {"strategy", "skipped":
        reason} for a batching strategy on a fixed-batch model}}``.

    Raises:
        UserError: bad arguments or a model that cannot be loaded or served.
    """
    check_load_args(qps, duration_s, slo_p99_ms, max_batch, max_wait_ms, threads)
    if rounds < 1:
        raise UserError(f"rounds must be >= 1; got {rounds}")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise UserError(f"strategies must be among {', '.join(STRATEGIES)}; got {list(strategies)}")
    session = session or open_session(onnx_path, threads)
    io = describe_model(session)
    warmup(session, max_batch)
    if inputs is None:
        inputs = random_inputs(io, seed=seed)
    note = None
    if io.fixed_batch is not None:
        note = (f"batch axis is {io.batch_axis}: served without batching "
                "(re-export with a dynamic batch axis to batch)")
    served = [s for s in strategies if io.fixed_batch is None or s == "none"]
    traces: dict[str, list[LoadTrace]] = {s: [] for s in served}
    settings: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for strategy in served:
            server = BatchingServer(session, strategy, max_batch, max_wait_ms)
            settings[strategy] = server.settings
            traces[strategy].append(drive(server, inputs, qps, duration_s / rounds,
                                          max_requests=max_requests, seed=seed + r))
    results = {
        s: summarize(traces[s], settings[s], qps, slo_p99_ms) if s in traces
        else {"strategy": s, "skipped": note}
        for s in strategies
    }
    return {
        "model": str(onnx_path),
        "batch_axis": io.batch_axis,
        "input": {"name": io.input_name, "sample_shape": list(io.sample_shape),
                  "dtype": str(io.dtype), "pool": int(len(inputs))},
        "threads": threads, "qps": float(qps), "duration_s": float(duration_s), "rounds": rounds,
        "slo_p99_ms": float(slo_p99_ms), "max_batch": max_batch, "max_wait_ms": max_wait_ms,
        "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(),
        "note": note, "strategies": results,
    }
