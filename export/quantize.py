"""INT8 ONNX with ONNX Runtime's quantizer, and checks of what a quantized graph really runs.

- :func:`quantize_static_ort`: static QDQ quantization (``quant_pre_process`` then
  ``quantize_static(quant_format=QDQ)``) for ONNX Runtime's CPU kernels or for TensorRT, with
  optional per-tensor scales (``TensorQuantOverrides``) learned elsewhere, e.g. by QAT.
- :func:`quantize_dynamic_ort`: INT8 weights, activations quantized on the fly (Linear/MatMul
  heavy students).
- :func:`qdq_to_float`: strip a QDQ graph back to float and return its scales as overrides.
  With it, QAT-learned ranges go into an *ORT-shaped* QDQ graph: one that ONNX Runtime fuses
  into ``QLinearConv``/``QGemm``/``QLinearAdd`` (Jacob et al. 2018, arXiv:1712.05877, for the
  integer-arithmetic scheme those kernels implement).
- :func:`fused_op_report` / :func:`qdq_structure`: what ORT actually runs, and the zero points
  and per-channel axes a back end will see (the tests' evidence).

Why an ORT-shaped graph matters: a QDQ graph that ORT cannot fuse runs float Conv plus extra
Q/DQ work and can be slower than FP32. Two traps seen on this stack: ``Conv->ReLU->Q`` with a
symmetric (zero point 0, int8) quantizer keeps the ReLU and the float Conv, while an asymmetric
post-ReLU quantizer lets ORT drop the ReLU and fuse; and signed int8 activations (ORT's
``quantize_static`` default) left 6 of 9 convolutions of our ResNet student unfused where
uint8 activations fused all 9 (ORT's own advice for x86 CPUs with VNNI is uint8 activations
with int8 weights, which is what ``target="onnxruntime"`` uses).

This module imports no Lightning (``distill bench`` and serving code use it alone).

Example:
    >>> info = quantize_static_ort("student.onnx", "student.int8.onnx", calib_batches)
    >>> fused_op_report(info["path"])["float_compute"]
    []
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from distill.io import atomic_path

TARGETS = ("onnxruntime", "tensorrt")
#: Ops that compute in float when they survive ORT's optimizer (their INT8 forms are fused).
FLOAT_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm",
                     "FusedMatMul")
INT8_COMPUTE_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention")
_Q, _DQ = "QuantizeLinear", "DequantizeLinear"


# --------------------------------------------------------------------------- helpers


def _to_numpy(batch: Any) -> np.ndarray:
    """A tensor / array / ``(x, y, ...)`` batch -> the float32 input array."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if hasattr(batch, "detach"):  # a torch tensor, without importing torch
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


def _calibration_arrays(calib_batches: Iterable[Any]) -> list[np.ndarray]:
    arrays = [_to_numpy(b) for b in calib_batches]
    if not arrays:
        raise ValueError("calib_batches is empty: static quantization needs at least one batch")
    return arrays


def _make_reader(input_name: str, arrays: list[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds the calibration batches once, in order."""

        def __init__(self) -> None:
            self._it = iter(arrays)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._it = iter(arrays)

    return _Reader()


def _graph_input_name(model: Any) -> str:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"expected a model with one input, got {inputs}")
    return inputs[0]


def _preprocess(src: Path, dst: Path) -> bool:
    """``quant_pre_process`` (shape inference + ORT basic optimizations); copy on failure.

    Returns whether pre-processing succeeded (it fails on some exotic graphs; quantizing the
    raw graph is still correct, only possibly less fused).
    """
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return True
    except Exception:  # noqa: BLE001 - any failure here only costs fusion, never correctness
        shutil.copyfile(src, dst)
        return False


def _array(model: Any, name: str, consts: Mapping[str, np.ndarray]) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return consts.get(name)


def _constants(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def spatial_means_to_global_pool(model: Any) -> int:
    """Rewrite ``ReduceMean(x, axes=H,W, keepdims=1)`` of a 4-D ``x`` as ``GlobalAveragePool``.

    Same arithmetic; ORT fuses ``DQ -> GlobalAveragePool -> Q`` into its INT8
    ``QLinearGlobalAveragePool`` but leaves a ReduceMean in float between a DQ and a Q (the
    dynamo exporter writes ``AdaptiveAvgPool2d(1)`` as ReduceMean). Needs shape information
    (``quant_pre_process`` adds it). Returns the number of nodes rewritten.
    """
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in list(model.graph.value_info) + list(model.graph.input)
             if v.type.tensor_type.HasField("shape")}
    count = 0
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        attrs = {a.name: a for a in node.attribute}
        axes = inits.get(node.input[1]) if len(node.input) > 1 else None
        if axes is None and "axes" in attrs:
            axes = np.array(attrs["axes"].ints)
        keepdims = attrs["keepdims"].i if "keepdims" in attrs else 1
        if axes is None or keepdims != 1 or sorted(int(a) % 4 for a in axes) != [2, 3]:
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        count += 1
    return count


def thin_convs(onnx_path: str | os.PathLike, min_fan_in: int) -> list[str]:
    """Conv nodes reading the graph input whose fan-in (``C_in/groups*kH*kW``) < ``min_fan_in``.

    An INT8 kernel gains nothing on a 9-long dot product (a 3x3 stem on a grey image) and
    the model would pay for quantizing its input: measured here, the INT8 1-channel stem took
    27 us, the float one 7 us. Only convolutions on the graph input qualify: deeper ones read
    an already quantized tensor, and ORT would quantize their float weights at load anyway
    (per tensor, less accurately than our per-channel scales).
    """
    import onnx

    model = onnx.load(str(onnx_path))
    consts = _constants(model)
    inputs = {i.name for i in model.graph.input}
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[0] not in inputs:
            continue
        w = _array(model, node.input[1], consts)
        if w is not None and w.ndim >= 3 and int(np.prod(w.shape[1:])) < min_fan_in:
            names.append(node.name)
    return names


# --------------------------------------------------------------------------- overrides


def _symmetric(scale: np.ndarray, zero_point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric ``(scale, zp)`` (uint8 or int8) -> symmetric int8 covering its range."""
    qmin, qmax = (0, 255) if zero_point.dtype == np.uint8 else (-128, 127)
    zp = zero_point.astype(np.float64)
    amax = np.maximum(np.abs((qmin - zp) * scale), np.abs((qmax - zp) * scale))
    return np.asarray(amax / 127.0, np.float32), np.zeros_like(zero_point, dtype=np.int8)


def _normalize_overrides(
    overrides: Mapping[str, Any], known: set[str], initializers: set[str], target: str
) -> tuple[dict[str, list[dict[str, Any]]], list[str], int]:
    """User / QAT overrides -> ORT's ``TensorQuantOverrides`` (numpy scalars of the right type).

    Returns ``(overrides, unknown_names, symmetrized)``. For ``tensorrt`` an asymmetric range
    is widened to the symmetric int8 range that covers it (TensorRT wants zero point 0).
    """
    act_dtype = np.int8 if target == "tensorrt" else np.uint8
    out: dict[str, list[dict[str, Any]]] = {}
    unknown, symmetrized = [], 0
    for name, value in overrides.items():
        if name not in known:
            unknown.append(name)
            continue
        entries = [value] if isinstance(value, Mapping) else list(value)
        fixed = []
        for entry in entries:
            if "scale" not in entry or "zero_point" not in entry:
                raise ValueError(f"override for '{name}' needs both 'scale' and 'zero_point'")
            scale = np.asarray(entry["scale"], dtype=np.float32)
            zp = np.asarray(entry["zero_point"])
            if not np.issubdtype(zp.dtype, np.integer) or zp.dtype.itemsize != 1:
                zp = zp.astype(np.int8 if name in initializers else act_dtype)
            if target == "tensorrt" and int(zp) != 0:
                scale, zp = _symmetric(scale, zp)
                symmetrized += 1
            elif name not in initializers and zp.dtype != act_dtype:
                raise ValueError(
                    f"override for activation '{name}' has a {zp.dtype} zero point; target "
                    f"'{target}' quantizes activations to {np.dtype(act_dtype).name}"
                )
            item = {"scale": scale, "zero_point": zp}
            if "axis" in entry:
                item["axis"] = int(entry["axis"])
            fixed.append(item)
        out[name] = fixed
    return out, unknown, symmetrized


# --------------------------------------------------------------------------- quantization


def quantize_static_ort(
    fp32_onnx: str | os.PathLike,
    out_path: str | os.PathLike,
    calib_batches: Iterable[Any],
    per_channel: bool = True,
    target: str = "onnxruntime",
    overrides: Mapping[str, Any] | None = None,
    nodes_to_exclude: Iterable[str] = (),
    float_fan_in_below: int = 0,
) -> dict[str, Any]:
    """Static INT8 QDQ quantization with ONNX Runtime's quantizer.

    ``x_q = clamp(round(x / scale) + zero_point, qmin, qmax)``, ranges from MinMax calibration
    over ``calib_batches`` unless ``overrides`` gives a tensor's scale and zero point.

    Args:
        fp32_onnx: The float model (one input).
        out_path: Where the QDQ model goes (written atomically).
        calib_batches: Input batches (arrays, tensors or ``(x, y)`` tuples).
        per_channel: Per-output-channel weight scales (axis 0 of Conv/Gemm weights).
        target: ``onnxruntime``: uint8 asymmetric activations, int8 symmetric weights (fused by
            ORT's CPU kernels; post-ReLU zero point lets ORT drop the ReLU); ``tensorrt``:
            int8 symmetric activations and weights, every zero point 0 (TensorRT's explicit
            quantization), per-channel weights.
        overrides: Tensor name -> ``{"scale", "zero_point"}`` (or a list of per-channel
            dicts with ``"axis"``), passed as ``extra_options["TensorQuantOverrides"]``.
            Names not in the model are skipped and reported.
        nodes_to_exclude: Node names kept in float.
        float_fan_in_below: Also keep in float every Conv reading the graph input with a
            fan-in below this (see :func:`thin_convs`); 0 keeps none.

    Returns:
        ``{path, size_mb, quantized, format, target, activation_type, weight_type,
        per_channel, calib_samples, preprocessed, overrides_applied, overrides_unknown,
        overrides_symmetrized, float_nodes, global_pools}`` (``global_pools``: spatial
        ReduceMeans rewritten by :func:`spatial_means_to_global_pool`).

    Raises:
        ValueError: unknown ``target``, empty ``calib_batches``, a malformed override.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got '{target}'")
    arrays = _calibration_arrays(calib_batches)
    out_path = Path(out_path)
    trt = target == "tensorrt"
    with tempfile.TemporaryDirectory(prefix="distill-q-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        preprocessed = _preprocess(Path(fp32_onnx), pre)
        model = onnx.load(str(pre))
        pooled = spatial_means_to_global_pool(model)
        if pooled:
            onnx.save(model, str(pre))
        known = {o for n in model.graph.node for o in n.output}
        known |= {i.name for i in model.graph.input}
        initializers = {i.name for i in model.graph.initializer}
        known |= initializers
        tqo, unknown, symmetrized = _normalize_overrides(
            overrides or {}, known, initializers, target
        )
        exclude = list(nodes_to_exclude)
        if float_fan_in_below > 0:
            exclude += [n for n in thin_convs(pre, float_fan_in_below) if n not in exclude]
        # A weight override would make ORT quantize an excluded node's weight anyway.
        excluded_weights = {i for n in model.graph.node if n.name in exclude for i in n.input[1:]}
        tqo = {k: v for k, v in tqo.items() if k not in excluded_weights}
        extra: dict[str, Any] = {"TensorQuantOverrides": tqo}
        if trt:
            extra.update(ActivationSymmetric=True, WeightSymmetric=True)
        act = QuantType.QInt8 if trt else QuantType.QUInt8
        with atomic_path(out_path) as tmp_out:
            quantize_static(
                str(pre), str(tmp_out), _make_reader(_graph_input_name(model), arrays),
                quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=act,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None,
                extra_options=extra,
            )
            onnx.checker.check_model(str(tmp_out))
    return {
        "path": str(out_path),
        "size_mb": out_path.stat().st_size / 2**20,
        "quantized": True,
        "format": "qdq",
        "target": target,
        "activation_type": "int8" if trt else "uint8",
        "weight_type": "int8",
        "per_channel": per_channel,
        "calib_samples": int(sum(len(a) for a in arrays)),
        "preprocessed": preprocessed,
        "overrides_applied": len(tqo),
        "overrides_unknown": unknown,
        "overrides_symmetrized": symmetrized,
        "float_nodes": exclude,
        "global_pools": pooled,
    }


def quantize_dynamic_ort(
    fp32_onnx: str | os.PathLike,
    out_path: str | os.PathLike,
    op_types: Iterable[str] = ("MatMul", "Gemm"),
    per_channel: bool = False,
) -> dict[str, Any]:
    """Dynamic INT8: weights stored int8, activations quantized per call (no calibration).

    Suits Linear/MatMul-heavy students; convolutions are left in float by default (ORT's
    ``ConvInteger`` is no faster than its float NCHWc convolution on CPU).

    Returns:
        ``{path, size_mb, quantized, format, op_types, preprocessed}``.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="distill-qd-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        preprocessed = _preprocess(Path(fp32_onnx), pre)
        with atomic_path(out_path) as tmp_out:
            quantize_dynamic(
                str(pre), str(tmp_out), op_types_to_quantize=list(op_types),
                per_channel=per_channel, weight_type=QuantType.QInt8,
            )
            onnx.checker.check_model(str(tmp_out))
    return {
        "path": str(out_path),
        "size_mb": out_path.stat().st_size / 2**20,
        "quantized": True,
        "format": "dynamic",
        "op_types": list(op_types),
        "preprocessed": preprocessed,
    }


# --------------------------------------------------------------------------- QDQ -> float


def qdq_to_float(qdq_onnx: str | os.PathLike, fp32_out: str | os.PathLike) -> dict[str, Any]:
    """Strip a QDQ graph to float and return its quantization parameters as overrides.

    Every ``Q -> DQ`` pair on an activation ``x`` is removed (its consumers read ``x``) and
    ``x``'s scale and zero point are recorded; every weight ``DQ(int8 initializer)`` becomes a
    float initializer holding the dequantized values (exactly representable with the recorded
    per-channel scales, so re-quantizing them reproduces the same integers). The tensor names
    are those of the QDQ file itself, so no name matching between two exports is needed.

    Returns:
        ``{"path", "overrides": {name: [ {scale, zero_point[, axis]} ... ]}, "activations",
        "weights", "conflicts"}``; ``conflicts`` lists tensors quantized twice with different
        parameters (the first is kept).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_onnx))
    graph = model.graph
    consts = _constants(model)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    overrides: dict[str, list[dict[str, Any]]] = {}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    new_inits, conflicts, n_act, n_w = [], [], 0, 0
    for node in graph.node:
        if node.op_type != _DQ:
            continue
        scale = _array(model, node.input[1], consts)
        zp = _array(model, node.input[2], consts) if len(node.input) > 2 else None
        src = producer.get(node.input[0])
        if src is not None and src.op_type == _Q:  # an activation's Q -> DQ pair
            x = src.input[0]
            rename[node.output[0]] = x
            drop.update((id(node), id(src)))
            entry = {"scale": np.asarray(scale, np.float32), "zero_point": np.asarray(zp)}
            if x in overrides:
                old = overrides[x][0]
                if not (np.allclose(old["scale"], entry["scale"])
                        and np.array_equal(old["zero_point"], entry["zero_point"])):
                    conflicts.append(x)
                continue
            overrides[x] = [entry]
            n_act += 1
            continue
        w = _array(model, node.input[0], consts)
        if w is None:
            continue  # a DQ fed by something we don't understand: leave it
        axis = _axis(node) % max(w.ndim, 1)
        zp = np.zeros_like(w) if zp is None else zp
        if np.ndim(scale) == 1:  # per-channel
            shape = [1] * w.ndim
            shape[axis] = -1
            wf = (w.astype(np.float32) - zp.astype(np.float32).reshape(shape)) * scale.reshape(
                shape
            )
        else:
            wf = (w.astype(np.float32) - np.float32(zp)) * np.float32(scale)
        name = _weight_name(node, consumers)
        rename[node.output[0]] = name
        new_inits.append(numpy_helper.from_array(wf.astype(np.float32), name))
        drop.add(id(node))
        if w.dtype == np.int32:
            continue  # a bias: ORT derives its int32 scale from input x weight scales
        n_w += 1
        if np.ndim(scale) == 1:
            overrides[name] = [
                {"axis": axis, "scale": np.asarray(s, np.float32), "zero_point": np.asarray(z)}
                for s, z in zip(scale, zp)
            ]
        else:
            overrides[name] = [
                {"scale": np.asarray(scale, np.float32), "zero_point": np.asarray(zp)}
            ]
    for node in graph.node:  # the exporter's stack traces describe the PT2E graph, not ours
        del node.metadata_props[:]
        node.doc_string = ""
    _rewire(graph, drop, rename, new_inits, overrides)
    onnx.checker.check_model(model)
    with atomic_path(fp32_out) as tmp:
        onnx.save(model, str(tmp))
    return {"path": str(fp32_out), "overrides": overrides, "activations": n_act,
            "weights": n_w, "conflicts": conflicts}


def _weight_name(dq: Any, consumers: Mapping[str, list[Any]]) -> str:
    """``<layer>.weight``/``.bias`` after the one node using a dequantized weight, if any."""
    users = consumers.get(dq.output[0], [])
    if len(users) != 1 or not users[0].name:
        return dq.output[0]
    user = users[0]
    index = list(user.input).index(dq.output[0])
    role = {1: "weight", 2: "bias"}.get(index, f"input{index}")
    return f"{user.name.removeprefix('node_')}.{role}"


def _rewire(graph: Any, drop: set[int], rename: dict[str, str], new_inits: list,
            overrides: dict[str, Any]) -> None:
    """Remove dropped nodes, point consumers at the float tensors, prune dead constants.

    A graph output that was a DQ's output takes over the name of the tensor it dequantized
    (so the graph keeps its output name and the override follows the tensor).
    """
    from onnx import helper

    outputs = {o.name for o in graph.output}
    kept = [n for n in graph.node if id(n) not in drop]
    sources = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    identities = []
    for out in [o for o in outputs if o in rename]:
        x = rename.pop(out)
        if x in sources or x in outputs:
            identities.append(helper.make_node("Identity", [x], [out], name=f"{out}_identity"))
            continue
        rename.update({k: out for k, v in rename.items() if v == x})
        rename[x] = out
        for node in kept:
            node.output[:] = [out if o == x else o for o in node.output]
        if x in overrides:
            overrides[out] = overrides.pop(x)
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept += identities
    graph.initializer.extend(new_inits)
    used = {i for n in kept for i in n.input} | outputs
    live = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(live)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


# --------------------------------------------------------------------------- inspection


def fused_op_report(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """What ONNX Runtime runs: the graph after its optimizer at ``ORT_ENABLE_EXTENDED``.

    EXTENDED applies the QDQ fusions (``DQ->Conv->Q`` -> ``QLinearConv``, Gemm -> ``QGemm``,
    Add -> ``QLinearAdd``) without ALL's layout-specific ops, so op types stay readable.

    Returns:
        ``{op_counts, float_compute, int8_compute, qdq_nodes}``: ``float_compute`` lists
        ``"OpType:node_name"`` of Conv/Gemm/MatMul (and their fused float forms) left in float
        -- empty for a fully fused INT8 model.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="distill-opt-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(opt)
        options.intra_op_num_threads = 1
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        nodes = list(onnx.load(str(opt)).graph.node)
    counts = Counter(n.op_type for n in nodes)
    return {
        "op_counts": dict(counts),
        "float_compute": [f"{n.op_type}:{n.name}" for n in nodes
                          if n.op_type in FLOAT_COMPUTE_OPS],
        "int8_compute": sum(counts[op] for op in INT8_COMPUTE_OPS),
        "qdq_nodes": counts[_Q] + counts[_DQ],
    }


def qdq_structure(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """Zero points and weight axes of a QDQ file, as a back end (e.g. TensorRT) reads them.

    Returns:
        ``{num_q, num_dq, zero_points: {node: [ints]}, zero_point_dtypes: [names],
        all_zero_points_zero, weight_axes: {initializer: axis or None}}``; ``axis`` is None
        for a per-tensor weight scale.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    consts = _constants(model)
    initializers = {i.name for i in model.graph.initializer} | set(consts)
    zps: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    axes: dict[str, int | None] = {}
    counts = Counter()
    for node in model.graph.node:
        if node.op_type not in (_Q, _DQ):
            continue
        counts[node.op_type] += 1
        zp = _array(model, node.input[2], consts) if len(node.input) > 2 else None
        zps[node.name] = [] if zp is None else [int(v) for v in np.ravel(zp)]
        if zp is not None:
            dtypes.add(zp.dtype.name)
        if node.op_type == _DQ and node.input[0] in initializers:
            scale = _array(model, node.input[1], consts)
            w = _array(model, node.input[0], consts)
            if w is not None and w.dtype != np.int32:  # int32 DQs are biases
                axes[node.input[0]] = _axis(node) if np.ndim(scale) == 1 else None
    return {
        "num_q": counts[_Q],
        "num_dq": counts[_DQ],
        "zero_points": zps,
        "zero_point_dtypes": sorted(dtypes),
        "all_zero_points_zero": all(v == 0 for vals in zps.values() for v in vals),
        "weight_axes": axes,
    }


def quantized_activations(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the activation tensors a QDQ file quantizes (inputs of its QuantizeLinear)."""
    import onnx

    model = onnx.load(str(onnx_path))
    initializers = {i.name for i in model.graph.initializer}
    names = [n.input[0] for n in model.graph.node if n.op_type == _Q]
    return sorted({n for n in names if n not in initializers})
