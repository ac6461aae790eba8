"""TensorRT engines from ONNX files and their latency (optional: needs ``tensorrt`` and a GPU).

TensorRT is imported lazily, so the rest of ``distill.export`` works without it. Versions 10
and 11 are supported by feature detection:

* FP16: TensorRT 10 has ``BuilderFlag.FP16``; TensorRT 11 removed the precision flags, and
  types come from the ONNX itself (a strongly typed network): export a float16 model instead.
* INT8 only through explicit Q/DQ nodes in the ONNX (symmetric, zero point 0), built as a
  strongly typed network without precision flags, as NVIDIA's explicit-quantization guide
  asks; there is no calibrator path.

Timing: each ``execute_async_v3`` call is bracketed by CUDA events on the engine's stream and
summarized like ONNX Runtime timings (:func:`distill.export.latency.summarize`).

Example:
    >>> blob = build_engine("student.onnx", "student.plan", max_batch=32)
    >>> measure_tensorrt_latency("student.plan", batch_sizes=(1, 32))[1]["p99_ms"]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.errors import UserError
from distill.io import atomic_write_bytes

from .latency import _check_args, summarize

INSTALL_HINT = (
    "install it with `pip install 'distill[tensorrt]'` on a machine with an NVIDIA GPU "
    "(the wheel fetches its libraries from NVIDIA's package index)"
)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module.

    Raises:
        UserError: TensorRT is not installed (the message says how to get it).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UserError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from None
    return trt


def _require_cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise UserError("TensorRT needs a CUDA GPU, but torch.cuda.is_available() is False")
    return torch


def _strongly_typed(trt: Any, quantized: bool) -> bool:
    # TensorRT 11 has no precision flags: every network takes its types from the ONNX.
    has_flag = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    return has_flag and (quantized or not hasattr(trt.BuilderFlag, "FP16"))


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    fp16: bool = False,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 32,
    workspace_mb: int = 1024,
) -> bytes:
    """Build a serialized TensorRT engine from an ONNX file.

    Args:
        onnx_path: The model (a dynamic batch gets an optimization profile
            ``min_batch <= opt_batch <= max_batch``; kernels are tuned for ``opt_batch``).
        engine_path: Where to write the engine (atomically); None keeps it in memory only.
        fp16: Allow FP16 kernels (TensorRT 10; TensorRT 11 wants a float16 ONNX instead).
        min_batch: Smallest batch the engine accepts.
        opt_batch: Batch the kernels are tuned for.
        max_batch: Largest batch the engine accepts.
        workspace_mb: Builder workspace memory limit.

    Returns:
        The serialized engine.

    Raises:
        UserError: TensorRT or a GPU is missing, the ONNX cannot be parsed, a bad batch range,
            or ``fp16`` on a TensorRT without the FP16 flag.
        RuntimeError: the build itself failed (TensorRT's log says why).
    """
    from .onnx import count_quant_nodes

    trt = import_tensorrt()
    _require_cuda()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(
            f"need 1 <= min_batch <= opt_batch <= max_batch; got {min_batch}, {opt_batch}, "
            f"{max_batch}"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = _strongly_typed(trt, count_quant_nodes(onnx_path) > 0)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors[0] if errors else '?'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if fp16:
        if strong or not hasattr(trt.BuilderFlag, "FP16"):
            raise UserError(
                "this network is strongly typed (TensorRT 11, or a Q/DQ model): FP16 comes "
                "from the ONNX's own types; export a float16 model instead of passing fp16"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise UserError(f"input '{tensor.name}' has dynamic dimensions besides the batch")
        if shape and shape[0] < 0:
            rest = shape[1:]
            profile.set_shape(tensor.name, [min_batch, *rest], [opt_batch, *rest],
                              [max_batch, *rest])
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT engine build failed for {onnx_path} (see its log)")
    data = bytes(blob)
    if engine_path is not None:
        atomic_write_bytes(engine_path, data)
    return data


def _torch_dtype(trt: Any, torch: Any, dtype: Any) -> Any:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool, "BF16": torch.bfloat16}
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    if name not in table:
        raise UserError(f"unsupported TensorRT tensor type {name}")
    return table[name]


class _Runner:
    """An engine, an execution context, device buffers for one batch size, and a stream."""

    def __init__(self, trt: Any, torch: Any, engine: Any) -> None:
        self.trt, self.torch, self.engine = trt, torch, engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, Any] = {}

    def bind(self, batch_size: int) -> None:
        trt, torch, engine, ctx = self.trt, self.torch, self.engine, self.context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                continue
            shape = list(engine.get_tensor_shape(name))
            if shape and shape[0] < 0:
                shape[0] = batch_size
            elif shape and shape[0] != batch_size:
                raise UserError(f"engine input '{name}' has a fixed batch of {shape[0]}")
            dtype = _torch_dtype(trt, torch, engine.get_tensor_dtype(name))
            self.buffers[name] = torch.randn(shape, device="cuda").to(dtype)
            if not ctx.set_input_shape(name, shape):
                raise UserError(f"batch {batch_size} is outside the engine's profile for "
                                f"input '{name}'")
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = list(ctx.get_tensor_shape(name))
                dtype = _torch_dtype(trt, torch, engine.get_tensor_dtype(name))
                self.buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, buf in self.buffers.items():
            ctx.set_tensor_address(name, buf.data_ptr())

    def run(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def times_ms(self, warmup: int, iters: int) -> list[float]:
        torch = self.torch
        for _ in range(warmup):
            self.run()
        self.stream.synchronize()
        pairs = []
        for _ in range(iters):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record(self.stream)
            self.run()
            end.record(self.stream)
            pairs.append((start, end))
        self.stream.synchronize()
        return [s.elapsed_time(e) for s, e in pairs]


def measure_tensorrt_latency(
    model_path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 20,
    iters: int = 200,
    fp16: bool = False,
    max_batch: int | None = None,
) -> dict[int, dict[str, Any]]:
    """Latency of a TensorRT engine per batch size, timed with CUDA events.

    Args:
        model_path: An ``.onnx`` file (an engine is built first, covering the batch sizes)
            or a serialized engine (``.plan`` / ``.engine``).
        batch_sizes: Batch sizes to time.
        warmup: Untimed calls per batch size.
        iters: Timed calls per batch size.
        fp16: Allow FP16 kernels when building from ONNX (TensorRT 10).
        max_batch: Largest batch of the built engine (default: the largest batch size).

    Returns:
        ``{batch_size: stats}`` with :func:`distill.export.latency.summarize`'s keys plus
        ``provider`` (``tensorrt-native``), ``tensorrt`` (version) and ``gpu``.

    Raises:
        UserError: TensorRT or a GPU is missing, a missing file, or bad arguments.
    """
    sizes = _check_args(batch_sizes, warmup, iters, None)
    trt = import_tensorrt()
    torch = _require_cuda()
    path = Path(model_path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    if path.suffix == ".onnx":
        blob = build_engine(path, fp16=fp16, min_batch=1, opt_batch=sizes[0],
                            max_batch=max_batch or max(sizes))
    else:
        blob = path.read_bytes()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(blob)
    if engine is None:
        raise UserError(f"{path}: not a TensorRT engine for this TensorRT/GPU")
    runner = _Runner(trt, torch, engine)
    results: dict[int, dict[str, Any]] = {}
    for b in sizes:
        runner.bind(b)
        stats: dict[str, Any] = summarize(runner.times_ms(warmup, iters), b)
        stats.update(provider="tensorrt-native", tensorrt=trt.__version__,
                     gpu=torch.cuda.get_device_name(), warmup=warmup)
        results[b] = stats
    return results

