"""Quantization-aware training (and PTQ) as an explicit, checkpointed callback.

Lifecycle of ``mode="qat"`` (Jacob et al. 2018, arXiv:1712.05877; Krishnamoorthi 2018,
arXiv:1806.08342 for the BN-freeze / observer-freeze schedule):

1. ``start_epoch`` (``on_train_epoch_start``): the student is captured with ``torch.export``
   and prepared with torchao's maintained PT2E flow (``prepare_qat_pt2e`` +
   ``X86InductorQuantizer`` QAT config: per-channel symmetric int8 weights, uint8 asymmetric
   activations, conv-BN folding simulated). ``pl_module.student`` is replaced by the prepared
   graph; the optimizer is rebuilt over it (moments carried over by parameter name), its LR
   scaled by ``lr_scale``.
2. Observers are calibrated on ``calib_batches`` training batches with fake-quant off.
3. Distillation continues unchanged with fake quantization in the forward pass
   (quantization-aware distillation: the module's loss is the same).
4. ``freeze_bn_epoch``: batch norms switch to their running statistics for good.
5. ``freeze_observer_epoch``: ranges stop moving; from then on only weights train.

Observers never see validation data: they are disabled from ``on_validation_start`` to
``on_validation_end`` (Lightning#8507), and the graph is moved to eval mode and back with
``move_exported_model_to_eval/train`` (exported graphs raise on ``.train()/.eval()``; the
callback makes those calls safe with ``allow_exported_model_train_eval`` because Lightning
calls ``model.eval()`` before validating).

Feature hooks are switched off (``pl_module.feature_hooks_enabled = False``): the exported
graph calls ATen ops on the parameters directly, so the named submodules that feature and
attention terms hook into are never called and their hooks would never fire.

``pl_module.exporter`` becomes an :class:`Int8Exporter`: the prepared graph is converted
(:func:`convert_for_export`: BN folded, fake quantizers as Q/DQ; ``convert_pt2e`` gives the same
graph but spends 26-50 s per call here searching conv-BN patterns), exported to a QDQ ONNX,
stripped back to float with its scales kept (:func:`distill.export.quantize.qdq_to_float`),
and re-quantized by ONNX Runtime's quantizer with those scales as ``TensorQuantOverrides``.
The result is an ORT-shaped QDQ graph that ORT fuses fully (the PT2E graph exported as is
leaves the Conv before each residual Add in float: X86InductorQuantizer puts no quantizer
between a Conv and the Add it feeds). Tensors PT2E does not quantize (those Conv outputs, the
logits) are calibrated on the training batches and listed in ``calibrated_activations``.

Resume: ``state_dict`` holds the phase and the epochs of each step. A checkpoint saved after
``start_epoch`` holds a prepared student; a ``load_state_dict`` pre-hook registered on the
LightningModule re-prepares the fresh float student before Lightning loads the weights, so the
weights, fake-quant scales and observer states load strictly.

Modes ``ptq_static`` / ``ptq_dynamic`` train nothing differently: from ``start_epoch`` the
exporter is ONNX Runtime static INT8 (calibrated) or dynamic INT8 of the float student.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

MODES = ("qat", "ptq_static", "ptq_dynamic")
TARGETS = ("onnxruntime", "tensorrt")
_BATCH_NORM = "aten.batch_norm"


# --------------------------------------------------------------------------- PT2E helpers


def prepare_qat(student: nn.Module, example_input: torch.Tensor) -> torch.fx.GraphModule:
    """Capture ``student`` with ``torch.export`` (dynamic batch) and insert fake quantizers."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    # Batch 2: torch.export specializes a size-1 dimension instead of keeping it dynamic.
    example = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
    dims = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    exported = torch.export.export(student, (example,), dynamic_shapes=dims).module()
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)
    )
    prepared = prepare_qat_pt2e(exported, quantizer)
    return allow_exported_model_train_eval(prepared)


def fake_quantizers(module: nn.Module) -> list[nn.Module]:
    """The fake-quantize modules of a prepared graph (empty for a float model)."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    return [m for m in module.modules() if isinstance(m, FakeQuantizeBase)]


def is_prepared(module: nn.Module) -> bool:
    return bool(fake_quantizers(module))


def set_observers(module: nn.Module, enabled: bool | list[bool]) -> list[bool]:
    """Enable/disable every observer (one bool, or one per quantizer); return the old flags."""
    fqs = fake_quantizers(module)
    old = [bool(fq.observer_enabled[0]) for fq in fqs]
    flags = [enabled] * len(fqs) if isinstance(enabled, bool) else enabled
    for fq, flag in zip(fqs, flags):
        fq.enable_observer(flag)
    return old


def freeze_batchnorm(graph_module: torch.fx.GraphModule) -> int:
    """Make every batch norm of an exported graph use (and stop updating) running statistics.

    The PT2E way (PyTorch's QAT tutorial): set the ``training`` argument of the ATen batch-norm
    nodes to False. ``move_exported_model_to_train`` undoes it, so it is re-applied after
    every such move. Returns the number of batch norms changed.
    """
    changed = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and _BATCH_NORM in str(node.target) and node.args[5]:
            args = list(node.args)
            args[5] = False
            node.args = tuple(args)
            changed += 1
    if changed:
        graph_module.recompile()
    return changed


def _to_train(module: nn.Module, bn_frozen: bool) -> None:
    from torchao.quantization.pt2e import move_exported_model_to_train

    move_exported_model_to_train(module)
    if bn_frozen:
        freeze_batchnorm(module)


def _to_eval(module: nn.Module) -> None:
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(module)


def prepare_for_state_dict(pl_module: nn.Module, state_dict: dict, prefix: str = "") -> bool:
    """Prepare ``pl_module.student`` if ``state_dict`` holds a QAT-prepared student.

    Call it before ``load_state_dict`` when loading such a checkpoint outside a Trainer (the
    callback does it itself on resume). Returns whether the student was prepared.
    """
    key = f"{prefix}student."
    saved = any(k.startswith(key) and "activation_post_process" in k and k.endswith(".scale")
                for k in state_dict)
    if not saved or is_prepared(pl_module.student):
        return False
    example = pl_module.example_input.to(next(pl_module.student.parameters()).device)
    pl_module.student = prepare_qat(pl_module.student, example)
    pl_module.feature_hooks_enabled = False  # see the module docstring
    return True


# --------------------------------------------------------------------------- exporter


class Int8Exporter:
    """``(student, path, example_input) -> dict``: INT8 ONNX of the student, ORT-shaped.

    Args:
        mode: ``qat`` (the student is a prepared PT2E graph), ``ptq_static``, ``ptq_dynamic``.
        calib_batches: Input batches (CPU tensors) for static calibration.
        target: ``onnxruntime`` or ``tensorrt`` (see ``quantize_static_ort``).
        float_fan_in_below: Convolutions with a smaller fan-in stay float (0: none).
        opset: ONNX opset of the intermediate float/QDQ exports.
    """

    def __init__(self, mode: str, calib_batches: list[torch.Tensor], target: str = "onnxruntime",
                 float_fan_in_below: int = 0, opset: int = 20) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got '{mode}'")
        if mode != "ptq_dynamic" and not calib_batches:
            raise ValueError(f"mode '{mode}' needs calibration batches; got none")
        self.mode, self.calib_batches, self.target = mode, calib_batches, target
        self.float_fan_in_below, self.opset = float_fan_in_below, opset

    def __call__(self, student: nn.Module, path: Path, example_input: torch.Tensor) -> dict:
        from distill.export.onnx import export_onnx
        from distill.export.quantize import (
            qdq_to_float,
            quantize_dynamic_ort,
            quantize_static_ort,
            quantized_activations,
        )

        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="distill-int8-") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            overrides, extra = None, {}
            if self.mode == "qat":
                qdq = Path(tmp) / "pt2e_qdq.onnx"
                export_onnx(convert_for_export(student), qdq, example_input.cpu(), self.opset)
                split = qdq_to_float(qdq, fp32)
                overrides = split["overrides"]
                extra = {"qat_activations": split["activations"], "qat_weights": split["weights"]}
            else:
                export_onnx(student, fp32, example_input.cpu(), self.opset)
            if self.mode == "ptq_dynamic":
                info = quantize_dynamic_ort(fp32, path)
            else:
                info = quantize_static_ort(
                    fp32, path, self.calib_batches, target=self.target, overrides=overrides,
                    float_fan_in_below=self.float_fan_in_below,
                )
        if self.mode == "qat":
            acts = quantized_activations(path)
            extra["calibrated_activations"] = [a for a in acts if a not in overrides]
        return {**info, **extra, "mode": self.mode, "export_s": time.perf_counter() - start}


def convert_for_export(prepared: nn.Module) -> torch.fx.GraphModule:
    """A deploy graph of a prepared student: BN folded, fake quantizers as Q/DQ ops.

    Same result as ``convert_pt2e`` (int8 weights + ``dequantize_per_channel``; activations
    ``quantize_per_tensor -> dequantize_per_tensor`` with the learned scale and zero point),
    computed on an eval-mode deep copy. ``convert_pt2e`` finds the QAT conv-BN pattern by
    exporting 108 candidate patterns with ``torch.export`` (26-50 s per call on this 2-core
    box); here the fold uses the identity that holds in eval mode, where the QAT pattern's
    divisor is the batch norm's own ``gamma / sqrt(var + eps)``:

        BN(conv(x, Wq) / s + b) = conv(x, Wq) + (b - mean) * s + beta,   s = gamma / sigma

    so the folded convolution keeps exactly the fake-quantized weights ``Wq``. A batch norm
    not in that form is left in the graph (ONNX Runtime folds it, at the cost of re-rounded
    weights). The fake-quant scales used are the buffers the fake-quant forward uses.
    """
    model = copy.deepcopy(prepared).cpu()
    _to_eval(model)
    set_observers(model, False)
    fq_types = tuple({type(fq) for fq in fake_quantizers(model)})
    memo: dict[Any, torch.Tensor | None] = {}
    graph = model.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), fq_types):
            _replace_fake_quant(model, node, _const(model, node.args[0], memo))
    for node in list(graph.nodes):
        if node.op == "call_function" and _BATCH_NORM in str(node.target):
            _fold_batchnorm(model, node, memo)
    for node in list(graph.nodes):  # in-place BN counters are dead in a deploy graph
        if node.op == "call_function" and "add_" in str(node.target) and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    model.recompile()
    return model


def _const(model: nn.Module, node: Any, memo: dict) -> torch.Tensor | None:
    """Value of a node computed from parameters/buffers only; None if it depends on inputs."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node not in memo:
        memo[node] = None
        if node.op == "get_attr":
            memo[node] = _attr(model, node.target)
        elif node.op in ("call_function", "call_module"):
            values = [_const(model, a, memo) if isinstance(a, torch.fx.Node) else a
                      for a in node.args]
            if all(v is not None for v in values):
                fn = model.get_submodule(node.target) if node.op == "call_module" else node.target
                with torch.no_grad():
                    memo[node] = fn(*values, **node.kwargs)
    return memo[node]


def _attr(model: nn.Module, target: str) -> torch.Tensor:
    *path, name = target.split(".")
    owner = model.get_submodule(".".join(path)) if path else model
    return getattr(owner, name)


def _new_attr(model: nn.Module, base: str, value: torch.Tensor) -> str:
    name, i = base, 0
    while hasattr(model, name):
        i, name = i + 1, f"{base}_{i + 1}"
    model.register_buffer(name, value.detach().clone())
    return name


def _replace_fake_quant(model: nn.Module, node: Any, weight: torch.Tensor | None) -> None:
    """One fake-quant call -> ``Q -> DQ`` (activations) or ``int8 constant -> DQ`` (weights)."""
    ops = torch.ops.quantized_decomposed
    fq = model.get_submodule(node.target)
    qrange = (int(fq.quant_min), int(fq.quant_max), fq.dtype)
    graph = model.graph
    with graph.inserting_before(node):
        if fq.is_per_channel:
            scale = graph.get_attr(_new_attr(model, "_qat_scale", fq.scale))
            zp = graph.get_attr(_new_attr(model, "_qat_zero_point", fq.zero_point))
            qparams = (fq.scale, fq.zero_point, int(fq.ch_axis), *qrange)
            dq, q_op = ops.dequantize_per_channel.default, ops.quantize_per_channel.default
            node_qparams = (scale, zp, int(fq.ch_axis), *qrange)
        else:
            qparams = (float(fq.scale), int(fq.zero_point), *qrange)
            dq, q_op = ops.dequantize_per_tensor.default, ops.quantize_per_tensor.default
            node_qparams = qparams
        if weight is not None:  # constant input: store the integers, like convert_pt2e
            q = graph.get_attr(_new_attr(model, "_qat_int_weight", q_op(weight, *qparams)))
        else:
            q = graph.call_function(q_op, (node.args[0], *node_qparams))
        out = graph.call_function(dq, (q, *node_qparams))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _fold_batchnorm(model: nn.Module, bn: Any, memo: dict) -> None:
    """Fold an eval-mode ``BN(conv(x, Wq) / s [+ b])`` with ``s == gamma/sigma`` into the conv."""
    gamma, beta, mean, var = (_const(model, a, memo) for a in bn.args[1:5])
    eps = float(bn.args[7])
    add = bn.args[0] if "aten.add" in str(bn.args[0].target) else None
    div = add.args[0] if add is not None else bn.args[0]
    conv = div.args[0] if "aten.div" in str(div.target) else None
    if conv is None or "conv" not in str(conv.target) or len(conv.users) != 1:
        return
    divisor, shift = _const(model, div.args[1], memo), 0.0
    if add is not None:
        shift = _const(model, add.args[1], memo)
    if any(v is None for v in (gamma, beta, mean, var, divisor, shift)):
        return
    s = gamma / torch.sqrt(var + eps)
    if divisor.numel() != s.numel() or not torch.allclose(divisor.flatten(), s, rtol=1e-5):
        return
    args = list(conv.args) + [None] * (3 - len(conv.args))
    base = _const(model, args[2], memo) if args[2] is not None else 0.0
    bias = base + (torch.as_tensor(shift).flatten() - mean) * s + beta
    with model.graph.inserting_before(conv):
        args[2] = model.graph.get_attr(_new_attr(model, "_qat_folded_bias", bias))
    conv.args = tuple(args)
    bn.replace_all_uses_with(conv)
    for node in (bn, add, div):
        if node is not None and not node.users:
            model.graph.erase_node(node)


# --------------------------------------------------------------------------- callback


class QuantizationAwareTraining(pl.Callback):
    """QAT with torchao PT2E, or post-training INT8, as the run's last compression step.

    Args:
        mode: ``qat``, ``ptq_static`` or ``ptq_dynamic``.
        start_epoch: First epoch trained with fake quantization (or exported as INT8).
        calib_batches: Training batches used to calibrate observers / ORT ranges.
        freeze_bn_epoch: Epoch from which batch norms use running statistics (None: never).
        freeze_observer_epoch: Epoch from which quantization ranges stop moving (None: never).
        target: ``onnxruntime`` (uint8 activations, ORT's CPU kernels) or ``tensorrt``
            (symmetric int8, zero point 0 everywhere).
        lr_scale: Multiplies the learning rate when fake quantization starts (QAT fine-tunes).
        float_fan_in_below: Convolutions with a smaller fan-in stay float in the INT8 file
            (0, the default: none, the ORT graph is fully integer). A 1-channel 3x3 stem has
            fan-in 9, which ORT's INT8 kernels run on a slow path; keeping it float paid off
            on a 16-channel full-resolution student, not on the default one.

    Example:
        >>> trainer = pl.Trainer(callbacks=[QuantizationAwareTraining("qat", start_epoch=2)])
    """

    def __init__(self, mode: str = "qat", start_epoch: int = 0, calib_batches: int = 8,
                 freeze_bn_epoch: int | None = None, freeze_observer_epoch: int | None = None,
                 target: str = "onnxruntime", lr_scale: float = 0.1,
                 float_fan_in_below: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got '{mode}'")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}; got '{target}'")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0; got {start_epoch}")
        if calib_batches < 1:
            raise ValueError(f"calib_batches must be >= 1; got {calib_batches}")
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be > 0; got {lr_scale}")
        if float_fan_in_below < 0:
            raise ValueError(f"float_fan_in_below must be >= 0; got {float_fan_in_below}")
        for name, epoch in (("freeze_bn_epoch", freeze_bn_epoch),
                            ("freeze_observer_epoch", freeze_observer_epoch)):
            if epoch is not None and epoch < start_epoch:
                raise ValueError(
                    f"{name} ({epoch}) must be >= start_epoch ({start_epoch}); fake quantization "
                    "starts at start_epoch"
                )
        self.mode, self.start_epoch, self.calib_batches = mode, start_epoch, calib_batches
        self.freeze_bn_epoch, self.freeze_observer_epoch = freeze_bn_epoch, freeze_observer_epoch
        self.target, self.lr_scale, self.float_fan_in_below = target, lr_scale, float_fan_in_below
        self.phase = "float"  # float -> fake_quant (qat) | int8_export (ptq)
        self.epochs: dict[str, int] = {}  # step -> epoch it happened at
        self._paused: list[bool] | None = None  # observer flags while validation runs
        self._calib: list[torch.Tensor] = []
        self._hook: Any = None

    @classmethod
    def from_config(cls, qat: Any) -> QuantizationAwareTraining:
        """Build from a recipe's ``qat`` section (a mapping with ``QATConfig``'s keys)."""
        keys = ("mode", "start_epoch", "calib_batches", "freeze_bn_epoch",
                "freeze_observer_epoch", "target", "lr_scale", "float_fan_in_below")
        return cls(**{k: qat[k] for k in keys if k in qat})

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[mode={self.mode}]"

    # ----- decision ------------------------------------------------------------------------
    def steps_due(self, epoch: int) -> list[str]:
        """The lifecycle steps to take at the start of ``epoch`` (pure: reads state only)."""
        if epoch < self.start_epoch:
            return []
        if self.mode != "qat":
            return [] if "int8_export" in self.epochs else ["int8_export"]
        steps = [] if "prepare" in self.epochs else ["prepare", "calibrate"]
        for step, at in (("freeze_bn", self.freeze_bn_epoch),
                         ("freeze_observers", self.freeze_observer_epoch)):
            if at is not None and epoch >= at and step not in self.epochs:
                steps.append(step)
        return steps

    # ----- hooks ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.mode == "qat" and self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(self._reprepare_on_load)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self._resume_training(pl_module)  # first: a step below may change observer flags
        for step in self.steps_due(epoch):
            getattr(self, f"_{step}")(trainer, pl_module)
            self.epochs[step] = epoch
            rank_zero_info(f"[qat] epoch {epoch}: {step}")
        self._resume_training(pl_module)
        if self.phase != "float" and pl_module.exporter is None:  # e.g. after a resume
            self._set_exporter(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._paused is not None:  # a validation ran mid-epoch
            self._resume_training(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Observers off and eval mode until training resumes.

        Not only for the validation loop: callbacks that run after it (the export's parity
        check on validation data) must not move the ranges either, so the flags come back at
        the next training batch, not in ``on_validation_end``.
        """
        if is_prepared(pl_module.student):
            if self._paused is None:
                self._paused = set_observers(pl_module.student, False)
            _to_eval(pl_module.student)

    on_test_start = on_validation_start

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_training(pl_module)

    def _resume_training(self, pl_module: pl.LightningModule) -> None:
        if not is_prepared(pl_module.student):
            return
        if self._paused is not None:
            set_observers(pl_module.student, self._paused)
            self._paused = None
        _to_train(pl_module.student, "freeze_bn" in self.epochs)

    # ----- steps (effects) -----------------------------------------------------------------
    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        old_params = dict(pl_module.named_parameters())
        example = pl_module.example_input.to(pl_module.device)
        if trainer.is_global_zero and self.mode == "qat":
            # The final FP32 student (after distillation and pruning), kept beside the INT8
            # student.onnx that the run delivers: the reference for accuracy and latency.
            from distill.export.onnx import export_onnx

            export_onnx(pl_module.student, Path(trainer.default_root_dir) / "student_fp32.onnx",
                        pl_module.example_input, exporter="auto")
        pl_module.student = prepare_qat(pl_module.student, example)
        pl_module.feature_hooks_enabled = False  # the graph has no callable named layers
        _rebuild_optimizers(trainer, pl_module, old_params, self.lr_scale)
        self.phase = "fake_quant"

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Observe ``calib_batches`` training batches with fake quantization off."""
        from torchao.quantization.pt2e import disable_fake_quant, enable_fake_quant

        student = pl_module.student
        batches = self._calibration_batches(trainer)
        student.apply(disable_fake_quant)
        set_observers(student, True)
        _to_eval(student)  # BN running statistics must not move on calibration data
        with torch.no_grad():
            for x in batches:
                student(x.to(pl_module.device))
        student.apply(enable_fake_quant)
        self._set_exporter(trainer, pl_module)

    def _freeze_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        freeze_batchnorm(pl_module.student)

    def _freeze_observers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_observers(pl_module.student, False)

    def _int8_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.phase = "int8_export"
        self._set_exporter(trainer, pl_module)

    def _set_exporter(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        calib = [] if self.mode == "ptq_dynamic" else self._calibration_batches(trainer)
        pl_module.exporter = Int8Exporter(self.mode, calib, self.target, self.float_fan_in_below)

    def _calibration_batches(self, trainer: pl.Trainer) -> list[torch.Tensor]:
        if not self._calib:
            loader = trainer.train_dataloader
            if loader is None:
                raise RuntimeError("QuantizationAwareTraining needs a train dataloader")
            for i, batch in enumerate(loader):
                if i >= self.calib_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                self._calib.append(x.detach().cpu())
        return self._calib

    def _reprepare_on_load(self, module: nn.Module, state_dict: dict, prefix: str,
                           *args: Any) -> None:
        """``load_state_dict`` pre-hook: prepare the fresh student if the checkpoint's was."""
        prepare_for_state_dict(module, state_dict, prefix)

    # ----- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "phase": self.phase, "epochs": dict(self.epochs),
                "paused_observers": None if self._paused is None else list(self._paused)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"checkpoint was trained with qat.mode='{state_dict['mode']}', "
                f"this run uses '{self.mode}'"
            )
        self.phase = state_dict["phase"]
        self.epochs = {k: int(v) for k, v in state_dict["epochs"].items()}
        paused = state_dict.get("paused_observers")
        self._paused = None if paused is None else [bool(f) for f in paused]


def _rebuild_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule,
                        old_params: dict[str, nn.Parameter], lr_scale: float) -> None:
    """Re-run ``configure_optimizers`` over the new student; keep moments and LR progress.

    Optimizer state moves over by parameter name (the prepared graph keeps the names); each
    group's current LR and each scheduler's progress carry over, scaled by ``lr_scale``.
    """
    strategy = trainer.strategy
    old_opts = list(strategy.optimizers)
    old_scheds = [c.scheduler for c in strategy.lr_scheduler_configs]
    if hasattr(strategy, "configure_ddp") and strategy.model is not pl_module:
        strategy.model = pl_module  # re-wrap: DDP registered the old parameters
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    new_params = {p: n for n, p in pl_module.named_parameters()}
    for old, new in zip(old_opts, strategy.optimizers):
        for group in new.param_groups:
            for p in group["params"]:
                before = old_params.get(new_params.get(p, ""))
                if before is not None and before in old.state:
                    new.state[p] = old.state[before]
        for g_old, g_new in zip(old.param_groups, new.param_groups):
            g_new["lr"] = g_old["lr"] * lr_scale
            if "initial_lr" in g_old:
                g_new["initial_lr"] = g_old["initial_lr"] * lr_scale
    for old, config in zip(old_scheds, strategy.lr_scheduler_configs):
        state = old.state_dict()
        state["base_lrs"] = [lr * lr_scale for lr in old.base_lrs]
        state["_last_lr"] = [g["lr"] for g in config.scheduler.optimizer.param_groups]
        config.scheduler.load_state_dict(state)
