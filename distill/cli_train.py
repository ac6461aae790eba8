"""``distill train``, ``distill recipes`` and ``distill export``."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from distill.errors import UserError


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="[RECIPE] [key=value ...]",
                   help="a recipe file or shipped recipe name (default: digits_kd), then "
                        "overrides such as trainer.max_epochs=3 targets.p99_ms=2")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from RUN_DIR/checkpoints/last.ckpt with its recipe")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    from distill.config import load_recipe

    items = list(args.items)
    recipe = None
    if items and "=" not in items[0]:
        recipe = items.pop(0)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "recipe.yaml").is_file():
            raise UserError(f"--resume: '{run_dir}' is not a run directory (no recipe.yaml)")
        if recipe is not None:
            raise UserError("--resume takes the run's own recipe; give overrides only")
        # The saved recipe goes through the same validation as any other (never trusted).
        cfg = load_recipe(run_dir / "recipe.yaml", items + [f"output_dir={run_dir}"])
    else:
        cfg = load_recipe(recipe, items)
    if args.quiet:
        cfg.trainer.enable_progress_bar = False
    _quiet_libraries()
    from distill.guards import TrainingDiverged
    from distill.run import train

    try:
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as exc:  # a failed run, not a bad input: one line, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" while writing '{exc.filename}'" if exc.filename else ""
        print(f"error: no space left on device{where}; every file already under its final "
              "name is complete (artifacts are written to a temporary name first); free "
              "space, then rerun, or --resume RUN_DIR once it has checkpoints/last.ckpt",
              file=sys.stderr)
        return 1
    if result.report:
        print(summary(result.report, result.run_dir))
    return 0


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is deprecated.*")
    warnings.filterwarnings("ignore", ".*exists and is not empty.*")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # torch.onnx warns about torchvision ops on every export; torchvision is not a dependency.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # torchao reports its optional CUDA kernels missing on every import on a CPU machine.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def summary(report: dict, run_dir: Path) -> str:
    t, s, tg = report["teacher"], report["student"], report["targets"]

    def p99(d: dict) -> str:
        v = d.get("latency_ms", {}).get("p99")
        return f"{v:.3f} ms" if v is not None else "n/a"

    met = f"met at epoch {tg['met_at_epoch']}" if tg["met"] else "not met"
    lines = [
        "",
        f"teacher  accuracy {t['accuracy']:.4f}   p99 {p99(t)}   size {t['size_mb']:.3f} MB",
        f"student  accuracy {s['accuracy']:.4f}   p99 {p99(s)}   size {s['size_mb']:.3f} MB"
        f"   ({s['format']}, epoch {s.get('epoch')})",
        f"accuracy drop {report['accuracy_drop']:.2f} points; p99 speed-up "
        f"{report['speedup_p99'] if report['speedup_p99'] is not None else 'n/a'}x; "
        f"targets {met}",
        f"run directory: {run_dir}  (student.onnx, report.md, report.json)",
    ]
    return "\n".join(lines)


def add_recipes_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run_recipes(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from distill.config import shipped_recipes

    for name, path in shipped_recipes().items():
        try:
            desc = OmegaConf.load(path).get("description", "") or ""
        except Exception:
            desc = "(cannot be parsed)"
        print(f"{name:<22} {desc}")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by `distill train` (.ckpt)")
    p.add_argument("--out", default=None, help="output ONNX path (default: beside the checkpoint)")


def run_export(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from distill.export_ckpt import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out) if args.out else None)
    print(f"wrote {out}")
    return 0
