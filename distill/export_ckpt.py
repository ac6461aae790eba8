"""``distill export CKPT``: rebuild the student of a checkpoint (pruned or not) and export it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from distill.errors import UserError


def export_checkpoint(ckpt: Path, out: Path | None = None) -> Path:
    """Export the student stored in a ``distill train`` checkpoint to a one-file ONNX.

    The recipe saved in the checkpoint goes through the same schema validation and the same
    instantiation checks as a recipe file: a downloaded checkpoint is not trusted.
    """
    from distill.arch import reshape_to_state_dict
    from distill.callbacks.qat import Int8Exporter, prepare_for_state_dict
    from distill.config import RecipeConfig, validate
    from distill.data import first_batches
    from distill.export.onnx import export_onnx
    from distill.instantiate import build_datamodule, build_model_from_cfg
    from distill.io import load_torch_file

    obj = load_torch_file(ckpt, "checkpoint")
    hp = obj.get("hyper_parameters", {}) if isinstance(obj, dict) else {}
    recipe = hp.get("recipe")
    if not isinstance(recipe, dict) or "state_dict" not in obj:
        raise UserError(f"checkpoint '{ckpt}' was not written by `distill train` (no recipe)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), recipe)
    except Exception as exc:
        raise UserError(f"checkpoint '{ckpt}': its recipe is invalid: {exc}") from None
    validate(cfg)
    r = OmegaConf.to_container(cfg, resolve=True)
    dm = build_datamodule(r["data"], r["seed"])
    student = build_model_from_cfg(r["student"], int(dm.input_shape[0]), int(dm.num_classes),
                                   "student")
    state = {k[len("student."):]: v for k, v in obj["state_dict"].items()
             if k.startswith("student.")}
    example = torch.zeros(1, *[int(d) for d in dm.input_shape])
    reshape_to_state_dict(student, state)  # a pruned student: shrink to the saved widths
    holder = SimpleNamespace(student=student, example_input=example)
    # a QAT student: re-prepare (it looks for "student.*" observer keys of the full state_dict)
    quantized = prepare_for_state_dict(holder, obj["state_dict"], prefix="")
    student = holder.student
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"checkpoint '{ckpt}' does not match its student: "
                        f"{str(exc).splitlines()[0]}") from None
    out = out or ckpt.with_suffix(".onnx")
    if quantized:
        # The INT8 export fills tensors it cannot map from QAT with calibration on train data.
        if hasattr(dm, "prepare"):
            dm.prepare()
        calib = first_batches(dm.train_dataloader(), r["qat"]["calib_batches"])
        exporter = Int8Exporter("qat", calib, target=r["qat"]["target"],
                                float_fan_in_below=r["qat"].get("float_fan_in_below", 0))
        exporter(student, out, example)
    else:
        export_onnx(student, out, example)
    return out
