"""The run builder: a validated recipe → data, teacher, student, callbacks, loggers → fit →
the delivered student and its report.

Everything that can fail on the user's input (recipe, files, classes, layer names, output
directory) is checked *before* the run directory is created, so a mistake never leaves a
half-written run behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distill.errors import UserError
from distill.io import atomic_copy, atomic_write_text, remove_temporaries

log = logging.getLogger("distill")


@dataclass
class RunResult:
    run_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


#: Set by global rank 0 before ``Trainer.fit``: the processes that Lightning's DDP launcher
#: starts re-run the whole command, and must write to rank 0's run directory, not to one with
#: their own timestamp.
RUN_DIR_ENV = "DISTILL_RUN_DIR"


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0 as its launcher set it (True when not launched).

    Works before ``Trainer.fit`` creates the process group: torchrun sets ``RANK``, ``srun``
    with several tasks ``SLURM_PROCID``, Lightning's DDP launcher ``NODE_RANK`` and
    ``LOCAL_RANK`` in the processes it starts.
    """
    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"]) == 0
    if _srun_tasks() > 1:
        return int(env["SLURM_PROCID"]) == 0
    return all(int(env.get(k, "0") or 0) == 0 for k in ("NODE_RANK", "GROUP_RANK", "LOCAL_RANK"))


def _srun_tasks() -> int:
    env = os.environ
    if not env.get("SLURM_PROCID", "").isdigit():
        return 0
    return int(env.get("SLURM_NTASKS", "1") or 1)


def _started_together() -> bool:
    """torchrun or srun started every rank at once: no rank can tell the others a timestamp."""
    return os.environ.get("RANK", "").isdigit() or _srun_tasks() > 1


def plan_run_dir(recipe: dict[str, Any]) -> Path:
    """Where this run writes (not created yet); a ``UserError`` if it cannot be written.

    Only global rank 0 checks it; the other ranks take rank 0's directory: ``DISTILL_RUN_DIR``
    (set by rank 0 for the processes Lightning launches) or ``output_dir``.
    """
    shared = os.environ.get(RUN_DIR_ENV)
    if not shared and not recipe.get("output_dir") and (_started_together()
                                                        or not is_launch_rank_zero()):
        raise UserError("a multi-process launch (torchrun, srun) needs output_dir=... so that "
                        "every rank writes to the same run directory")
    if not is_launch_rank_zero():
        return Path(shared or recipe["output_dir"]).expanduser()
    if recipe.get("output_dir"):
        run_dir = Path(recipe["output_dir"]).expanduser()
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / recipe["name"] / stamp
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = Path("runs") / recipe["name"] / f"{stamp}-{n}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir '{run_dir}' exists and is a file")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"output_dir '{run_dir}' is not empty (use --resume to continue a run)")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output_dir '{run_dir}': '{parent}' is a file")
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError:
        raise UserError(f"output_dir '{run_dir}' is not writable ('{parent}' denies it)") from None
    return run_dir


def _trainer_kwargs(recipe: dict[str, Any]) -> dict[str, Any]:
    t = dict(recipe["trainer"])
    return {k: v for k, v in t.items() if v is not None}


def build_callbacks(recipe: dict[str, Any], run_dir: Path, teacher_accuracy: float | None
                    ) -> list[Any]:
    """Callbacks in the order the design asks for: prune → QAT → export/measure → target stop."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from distill.guards import NonFiniteLossGuard

    callbacks: list[Any] = [
        # `last.ckpt` after every validation, overwritten in place (Lightning writes it
        # atomically): what --resume continues from. (save_last=True with save_top_k=0 would
        # write it only when training ends, too late for a killed run.)
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None,
                        save_top_k=1, save_last=False, save_on_train_epoch_end=False,
                        enable_version_counter=False),
        NonFiniteLossGuard(),
    ]
    prune = recipe["prune"]
    if prune["method"] != "none":
        callbacks.append(_pruning_callback(prune))
    if recipe["qat"]["mode"] != "none":
        from distill.callbacks.qat import QuantizationAwareTraining

        callbacks.append(QuantizationAwareTraining.from_config(recipe["qat"]))
    e = recipe["export"]
    if e["enabled"]:
        from distill.callbacks.export_and_measure import ExportAndMeasure
        from distill.callbacks.target_stop import TargetStop

        measure = ExportAndMeasure(
            out_dir=run_dir, every_n_epochs=e["every_n_epochs"], batch_sizes=e["batch_sizes"],
            threads=e["threads"], provider=e["provider"], warmup=e["warmup"], iters=e["iters"],
            subprocess=e["subprocess"], parity_atol=e["parity_atol"], opset=e["opset"],
            exporter=e["exporter"], tensorrt=e["tensorrt"],
        )
        t = recipe["targets"]
        callbacks += [
            measure,
            TargetStop(
                accuracy=t["accuracy"], max_accuracy_drop=t["max_accuracy_drop"],
                teacher_accuracy=teacher_accuracy, p99_ms=t["p99_ms"], size_mb=t["size_mb"],
                confirm_margin=t["confirm_margin"],
            ),
        ]
    return callbacks


def _pruning_callback(prune: dict[str, Any]) -> Any:
    if prune["method"] == "structured":
        from distill.callbacks.structured_pruning import StructuredPruning

        return StructuredPruning.from_config(prune)
    from distill.callbacks.unstructured_pruning import UnstructuredPruning

    return UnstructuredPruning.from_config(prune)


def _loggers(recipe: dict[str, Any], run_dir: Path, resume: bool = False,
             rank_zero: bool = True) -> list[Any]:
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    lg = recipe["logger"]
    loggers: list[Any] = []
    if lg["csv"]:
        if resume and rank_zero:
            _keep_previous_csv(run_dir)
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))
    if lg["wandb"] and lg["mode"] != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb-data"))
        loggers.append(WandbLogger(
            project=lg["project"], name=f"{recipe['name']}-{run_dir.name}",
            save_dir=str(run_dir), offline=lg["mode"] == "offline", config=recipe,
            id=_wandb_run_id(run_dir, rank_zero), resume="allow",
        ))
    return loggers


def _keep_previous_csv(run_dir: Path) -> None:
    """Lightning's CSV logger deletes an existing ``metrics.csv``: keep it under a new name."""
    csv = run_dir / "metrics.csv"
    n = 1
    while (run_dir / f"metrics.before-resume-{n}.csv").exists():
        n += 1
    if csv.is_file():
        os.replace(csv, run_dir / f"metrics.before-resume-{n}.csv")


def _wandb_run_id(run_dir: Path, rank_zero: bool) -> str | None:
    """The run's W&B id, kept in the run directory so that ``--resume`` continues that run."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip() or None
    if not rank_zero:  # only rank 0 logs to W&B
        return None
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n")
    return run_id


def train(cfg: DictConfig, resume: str | Path | None = None) -> RunResult:
    """Run a validated recipe end to end; returns the run directory and the report."""
    import pytorch_lightning as pl

    from distill.instantiate import build_datamodule, build_model_from_cfg
    from distill.module import DistillationModule
    from distill.perf import tune_allocator
    from distill.teacher import load_or_train_teacher

    tune_allocator()
    recipe = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(recipe, dict)
    ckpt_path = None
    if resume is not None:
        run_dir = Path(resume)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise UserError(f"--resume: no checkpoint to resume at '{ckpt}'")
        _check_checkpoint(ckpt)
        ckpt_path = str(ckpt)
    else:
        run_dir = plan_run_dir(recipe)
    pl.seed_everything(recipe["seed"], workers=True, verbose=False)

    dm = build_datamodule(recipe["data"], recipe["seed"])
    if hasattr(dm, "prepare"):
        dm.prepare()
    else:
        dm.setup("fit")
    in_ch, ncls = int(dm.input_shape[0]), int(dm.num_classes)
    student = build_model_from_cfg(recipe["student"], in_ch, ncls, "student")
    example = next(iter(dm.val_dataloader()))[0][:1].float()
    try:
        student.eval()(example)
    except Exception as exc:
        raise UserError(f"student does not accept the data's input {tuple(example.shape)}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    student.train()
    if recipe["distill"]["cache_teacher"]:
        from distill.teacher_cache import check_deterministic

        check_deterministic(dm.train_dataloader().dataset)
    rank_zero = is_launch_rank_zero()
    if not rank_zero:
        _wait_for_teacher_cache(recipe)
    teacher, teacher_info = load_or_train_teacher(recipe, dm, in_ch, ncls)
    # The same student run whether the teacher was trained now or loaded from the cache.
    pl.seed_everything(recipe["seed"], workers=True, verbose=False)
    try:
        module = DistillationModule(student, teacher, ncls, example, distill=recipe["distill"],
                                    optim=recipe["optim"], recipe=recipe)
    except ValueError as exc:
        raise UserError(str(exc)) from None

    # Everything the user gave has been checked: from here on the run directory exists.
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is None and rank_zero:
        atomic_write_text(run_dir / "recipe.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    elif rank_zero:  # a killed run leaves half-written temporaries (never final names)
        for path in remove_temporaries(run_dir):
            log.info("removed the temporary file of an interrupted write: %s", path)
    teacher_stats = _measure_teacher(teacher, teacher_info, dm, example, run_dir, recipe,
                                     rank_zero)
    callbacks = build_callbacks(recipe, run_dir, teacher_stats.get("accuracy"))
    loggers = _loggers(recipe, run_dir, resume=resume is not None, rank_zero=rank_zero)
    trainer = pl.Trainer(
        **_trainer_kwargs(recipe), callbacks=callbacks, logger=loggers or False,
        default_root_dir=str(run_dir), num_sanity_val_steps=0, enable_model_summary=False,
    )
    module.train()  # Lightning 2.6 does not switch a module left in eval mode back to train
    started = time.perf_counter()
    # The DDP launcher re-runs this command for ranks > 0: they inherit the run directory.
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    fit_seconds = time.perf_counter() - started
    report: dict[str, Any] = {}
    if trainer.is_global_zero:
        report = deliver(trainer, module, recipe, run_dir, dm, teacher_stats, fit_seconds)
    for logger in loggers:
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
    return RunResult(run_dir=run_dir, report=report)


def _check_checkpoint(ckpt: Path) -> None:
    """Fail before anything is built (and the run directory touched) on a damaged checkpoint.

    ``torch.save`` writes a zip archive: a truncated or overwritten file has no readable
    directory or fails a member's CRC. Nothing is unpickled here.
    """
    try:
        with zipfile.ZipFile(ckpt) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"--resume: checkpoint '{ckpt}' is damaged (truncated or not a torch "
                        f"checkpoint: {exc})") from None
    if bad is not None:
        raise UserError(f"--resume: checkpoint '{ckpt}' is damaged (corrupted member '{bad}')")


def _measure_teacher(teacher: Any, info: dict[str, Any], dm: Any, example: Any, run_dir: Path,
                     recipe: dict[str, Any], rank_zero: bool) -> dict[str, Any]:
    """The teacher's numbers; ranks > 0 only need its accuracy (``TargetStop``), and score a
    throw-away export so that only rank 0 writes into the run directory."""
    from distill.report import measure_teacher

    if rank_zero:
        return measure_teacher(teacher, info, dm, example, run_dir, recipe)
    quiet = {**recipe, "export": {**recipe["export"], "enabled": False}}  # no timing
    with tempfile.TemporaryDirectory(prefix="distill-rank-") as tmp:
        return measure_teacher(teacher, info, dm, example, Path(tmp), quiet)


def _wait_for_teacher_cache(recipe: dict[str, Any], poll_s: float = 2.0) -> None:
    """Ranks > 0 of a torchrun/srun launch wait for rank 0 to train and cache the teacher.

    (Lightning's own launcher starts them after rank 0 has cached it: no wait then.) Without
    this every rank would train its own teacher, possibly a different one on GPUs.
    """
    from distill.teacher import teacher_cache_key

    t = recipe["teacher"]
    if t.get("checkpoint"):
        return
    cache = Path(t["cache_dir"]).expanduser() / f"teacher-{teacher_cache_key(recipe)}.pt"
    limit = float(os.environ.get("DISTILL_TEACHER_WAIT_S", "86400"))
    deadline = time.monotonic() + limit
    while not cache.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"rank 0 did not cache the teacher at '{cache}' within {limit:g} s "
                            "(on several nodes teacher.cache_dir must be a shared filesystem; "
                            "or give teacher.checkpoint)")
        time.sleep(poll_s)


def deliver(trainer: Any, module: Any, recipe: dict[str, Any], run_dir: Path, dm: Any,
            teacher_stats: dict[str, Any], fit_seconds: float) -> dict[str, Any]:
    """Copy the chosen epoch's ONNX to ``student.onnx`` and write the report."""
    from distill.report import build_report, final_student_stats, write_report

    measure = next((c for c in trainer.callbacks if type(c).__name__ == "ExportAndMeasure"), None)
    stopper = next((c for c in trainer.callbacks if type(c).__name__ == "TargetStop"), None)
    rows = list(measure.rows) if measure is not None else []
    delivered, reason = (None, "export disabled: the final student is delivered")
    if stopper is not None:
        delivered, reason = stopper.choose_delivery(rows)
    student_onnx = run_dir / "student.onnx"
    if delivered is not None and delivered.get("onnx") and Path(delivered["onnx"]).is_file():
        atomic_copy(delivered["onnx"], student_onnx)
    else:
        from distill.export.onnx import export_onnx

        export_onnx(module.student, student_onnx, module.example_input,
                    exporter=recipe["export"]["exporter"])
        if delivered is None and rows:
            reason = "no epoch exported successfully: the final student is delivered"
    import torch

    fp32 = run_dir / "student_fp32.onnx"
    if (delivered or {}).get("quantized") and not fp32.exists() and not isinstance(
            module.student, torch.fx.GraphModule):  # PTQ: the student itself is still FP32
        from distill.export.onnx import export_onnx

        export_onnx(module.student, fp32, module.example_input,
                    exporter=recipe["export"]["exporter"])
    student_stats = final_student_stats(student_onnx, module, dm, recipe, delivered)
    serving = _serving_check(student_onnx, recipe, dm)
    report = build_report(recipe, teacher_stats, student_stats, rows, delivered, reason,
                          stopper, trainer, fit_seconds, input_spec(dm))
    if serving is not None:
        report["serving"] = serving
    write_report(run_dir, report, trainer)
    return report


def input_spec(dm: Any) -> dict[str, Any]:
    """What a server must feed the model: name, shape, dtype, preprocessing, labels."""
    return {
        "name": "input",
        "shape": ["batch", *[int(d) for d in dm.input_shape]],
        "dtype": "float32",
        "preprocessing": dict(getattr(dm, "preprocessing", {}) or {}),
        "labels": list(getattr(dm, "class_names", []) or range(int(dm.num_classes))),
    }


def _serving_check(onnx_path: Path, recipe: dict[str, Any], dm: Any) -> dict[str, Any] | None:
    """The optional ``serving`` section: the delivered student under Poisson load."""
    sv = recipe["serving"]
    if not sv["enabled"]:
        return None
    import numpy as np

    from distill.export.serving import serving_report

    inputs = np.concatenate([b[0].numpy() for b in dm.val_dataloader()]).astype(np.float32)
    return serving_report(onnx_path, qps=sv["qps"], duration_s=sv["duration_s"],
                          slo_p99_ms=sv["slo_p99_ms"], max_batch=sv["max_batch"],
                          max_wait_ms=sv["max_wait_ms"], threads=recipe["export"]["threads"],
                          inputs=inputs, seed=recipe["seed"])
