"""The run's report: ``report.json`` (stable keys, documented in the README), ``report.md``,
``pareto.png`` and ``MODEL_CARD.md``; the same numbers go to W&B.

Accuracy and latency are those of the exported ONNX model run in ONNX Runtime: what ships is
what is scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

import distill
from distill.arch import count_macs
from distill.io import atomic_path, atomic_write_json, atomic_write_text
from distill.models import count_params

REPORT_VERSION = 1


def _latency_summary(onnx_path: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    from distill.export.latency import measure_latency

    e = recipe["export"]
    res = measure_latency(onnx_path, batch_sizes=[1], provider=e["provider"], threads=e["threads"],
                          warmup=e["warmup"], iters=e["iters"], subprocess=e["subprocess"])
    one = res[1]
    return {
        "latency_ms": {k: round(float(one[f"{k}_ms"]), 4) for k in ("p50", "p95", "p99", "mean")},
        "throughput_qps": round(float(one["throughput_qps"]), 1),
        "latency_cv": round(float(one["cv"]), 3),
    }


def measure_teacher(teacher: nn.Module, info: dict[str, Any], dm: Any, example: torch.Tensor,
                    run_dir: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """Export the teacher once, score it in ONNX Runtime and time it like the student."""
    from distill.export.onnx import evaluate_onnx, export_onnx

    path = run_dir / "teacher.onnx"
    if info.get("source") == "onnx":
        from distill.io import atomic_copy

        atomic_copy(info["path"], path)
        params, macs = None, None
    else:
        export_onnx(teacher, path, example, exporter=recipe["export"]["exporter"])
        params, macs = count_params(teacher), count_macs(teacher, example)
    stats: dict[str, Any] = {
        "accuracy": round(float(evaluate_onnx(path, dm.val_dataloader(),
                                              threads=recipe["export"]["threads"])), 4),
        "params": params,
        "macs": macs,
        "size_mb": round(path.stat().st_size / 2**20, 4),
        "format": "onnx-fp32",
        "source": info.get("source"),
        "onnx": str(path),
    }
    if recipe["export"]["enabled"]:
        stats.update(_latency_summary(path, recipe))
    return stats


def final_student_stats(onnx_path: Path, module: Any, dm: Any, recipe: dict[str, Any],
                        row: dict[str, Any] | None) -> dict[str, Any]:
    """Numbers of the delivered ``student.onnx`` (re-scored on val and test in ORT)."""
    from distill.export.onnx import evaluate_onnx

    threads = recipe["export"]["threads"]
    quantized = bool(row.get("quantized")) if row else False
    stats: dict[str, Any] = {
        # the delivered epoch was scored on the same file and split already: reuse it
        "accuracy": round(float(
            (row or {}).get("val_accuracy_onnx")
            if (row or {}).get("val_accuracy_onnx") is not None
            else evaluate_onnx(onnx_path, dm.val_dataloader(), threads=threads)), 4),
        "test_accuracy": round(float(evaluate_onnx(onnx_path, dm.test_dataloader(),
                                                   threads=threads)), 4),
        "params": (row or {}).get("params") or count_params(module.student),
        "macs": (row or {}).get("macs") or count_macs(module.student, module.example_input)
        or None,
        "size_mb": round(onnx_path.stat().st_size / 2**20, 4),
        "format": "onnx-int8-qdq" if quantized else "onnx-fp32",
        "epoch": (row or {}).get("epoch"),
        "sparsity": (row or {}).get("sparsity"),
    }
    if recipe["export"]["enabled"]:
        stats.update(_latency_summary(onnx_path, recipe))
    return stats


def environment(recipe: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    from distill.perf import allocator_tuned

    return {
        "distill": distill.__version__,
        "git_commit": _git_commit(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "threads": recipe["export"]["threads"],
        "provider": recipe["export"]["provider"],
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "malloc": "tuned" if allocator_tuned() else "system",
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_report(recipe: dict[str, Any], teacher: dict[str, Any], student: dict[str, Any],
                 rows: list[dict[str, Any]], delivered: dict[str, Any] | None, reason: str,
                 stopper: Any, trainer: Any, fit_seconds: float,
                 input_spec: dict[str, Any]) -> dict[str, Any]:
    t = recipe["targets"]
    met_at = getattr(stopper, "met_at_epoch", None)
    s99 = student.get("latency_ms", {}).get("p99")
    t99 = teacher.get("latency_ms", {}).get("p99")
    report = {
        "version": REPORT_VERSION,
        "name": recipe["name"],
        "recipe_sha256": hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str)
                                        .encode()).hexdigest()[:16],
        "teacher": {k: v for k, v in teacher.items() if k != "onnx"},
        "student": student,
        "epochs": [_epoch_row(r) for r in rows],
        "targets": {
            "accuracy": t["accuracy"], "max_accuracy_drop": t["max_accuracy_drop"],
            "p99_ms": t["p99_ms"], "size_mb": t["size_mb"],
            "met": met_at is not None, "met_at_epoch": met_at,
        },
        "delivered": {"epoch": (delivered or {}).get("epoch"), "reason": reason,
                      "onnx": "student.onnx"},
        "speedup_p99": round(t99 / s99, 3) if s99 and t99 else None,
        "accuracy_drop": round(100 * (teacher["accuracy"] - student["accuracy"]), 2),
        "epochs_trained": int(trainer.current_epoch),
        "stopped_early": bool(met_at is not None and trainer.current_epoch
                              < recipe["trainer"]["max_epochs"]),
        "fit_seconds": round(fit_seconds, 1),
        "input": input_spec,
        "environment": environment(recipe),
    }
    return report


_ROW_KEYS = ("epoch", "val_accuracy", "val_accuracy_onnx", "p50_ms", "p95_ms", "p99_ms",
             "size_mb", "params", "macs", "sparsity", "quantized", "parity_max_abs",
             "parity_ok", "onnx", "error", "epoch_s", "export_s", "measure_s")


def _epoch_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in _ROW_KEYS}
    if out["onnx"]:
        out["onnx"] = str(Path(out["onnx"]).relative_to(Path(out["onnx"]).parent.parent))
    return out


def render_markdown(report: dict[str, Any]) -> str:
    t, s, tg = report["teacher"], report["student"], report["targets"]

    def lat(d: dict[str, Any], k: str) -> str:
        v = d.get("latency_ms", {}).get(k)
        return f"{v:.3f}" if v is not None else "—"

    def num(v: Any, fmt: str = "{:,}") -> str:
        return fmt.format(v) if v is not None else "—"

    lines = [
        f"# distill report: {report['name']}",
        "",
        "Accuracy and latency are measured on the exported ONNX models in ONNX Runtime "
        f"({report['environment']['provider']}, {report['environment']['threads']} thread(s), "
        f"batch 1) on {report['environment']['cpu']}.",
        "",
        "| | accuracy (val) | p50 ms | p95 ms | p99 ms | params | MACs | size MB | format |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| teacher | {t['accuracy']:.4f} | {lat(t, 'p50')} | {lat(t, 'p95')} | {lat(t, 'p99')} | "
        f"{num(t.get('params'))} | {num(t.get('macs'))} | {t['size_mb']:.3f} | {t['format']} |",
        f"| student | {s['accuracy']:.4f} | {lat(s, 'p50')} | {lat(s, 'p95')} | {lat(s, 'p99')} | "
        f"{num(s.get('params'))} | {num(s.get('macs'))} | {s['size_mb']:.3f} | {s['format']} |",
        "",
        f"- Speed-up (teacher p99 / student p99): **{num(report['speedup_p99'], '{:.2f}')}×**; "
        f"accuracy drop: **{report['accuracy_drop']:.2f} points**; student test accuracy "
        f"{s.get('test_accuracy', 0):.4f}.",
        f"- Targets: accuracy {num(tg['accuracy'])}, max drop {num(tg['max_accuracy_drop'])}, "
        f"p99 {num(tg['p99_ms'])} ms, size {num(tg['size_mb'])} MB → "
        + (f"**met at epoch {tg['met_at_epoch']}**" if tg["met"] else "**not met**") + ".",
        f"- Delivered: `student.onnx` from epoch {report['delivered']['epoch']} "
        f"({report['delivered']['reason']}).",
        f"- Trained {report['epochs_trained']} epoch(s) in {report['fit_seconds']} s.",
        "",
        "## Epochs",
        "",
        "| epoch | val acc (torch) | val acc (ONNX) | p50 ms | p99 ms | size MB | sparsity | "
        "int8 | parity max abs | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["epochs"]:
        def f(v: Any, spec: str = "{:.4f}") -> str:
            return spec.format(v) if isinstance(v, (int, float)) and v is not None else "—"
        lines.append(
            f"| {r['epoch']} | {f(r['val_accuracy'])} | {f(r['val_accuracy_onnx'])} | "
            f"{f(r['p50_ms'], '{:.3f}')} | {f(r['p99_ms'], '{:.3f}')} | "
            f"{f(r['size_mb'], '{:.3f}')} "
            f"| {f(r['sparsity'], '{:.2f}')} | {'yes' if r['quantized'] else 'no'} | "
            f"{f(r['parity_max_abs'], '{:.2e}')} | {r['error'] or ''} |"
        )
    lines += ["", "![accuracy vs p99](pareto.png)", ""]
    if report.get("serving"):
        sv = report["serving"]
        lines += ["## Serving check", "",
                  f"Poisson arrivals at {sv['qps']} requests/s for {sv['duration_s']} s per "
                  f"strategy, {sv['threads']} ORT thread(s); SLO p99 ≤ {sv['slo_p99_ms']} ms.", "",
                  "| strategy | p50 ms | p95 ms | p99 ms | achieved qps | mean batch | SLO |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in sv["strategies"].items():
            if r.get("skipped"):
                lines.append(f"| {name} | skipped: {r['skipped']} | | | | | |")
                continue
            lines.append(
                f"| {name} | {r.get('p50_ms')} | {r.get('p95_ms')} | {r.get('p99_ms')} | "
                f"{r.get('achieved_qps')} | {r.get('mean_batch')} | "
                f"{'met' if r.get('slo_met') else 'missed'} |")
        lines.append("")
    return "\n".join(lines)


def plot_pareto(report: dict[str, Any], path: Path) -> Path | None:
    """Accuracy vs p99 for every measured epoch, the teacher and the targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["epochs"] if r.get("p99_ms") is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if rows:
        ax.plot([r["p99_ms"] for r in rows],
                [r["val_accuracy_onnx"] or r["val_accuracy"] or 0 for r in rows],
                "o-", color="tab:blue", label="student (per epoch)")
        for r in rows:
            ax.annotate(str(r["epoch"]), (r["p99_ms"], r["val_accuracy_onnx"] or 0), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    t = report["teacher"]
    if t.get("latency_ms"):
        ax.plot([t["latency_ms"]["p99"]], [t["accuracy"]], "s", color="tab:red", label="teacher")
    tg = report["targets"]
    if tg.get("p99_ms"):
        ax.axvline(tg["p99_ms"], ls="--", color="gray", label="p99 target")
    floor = tg.get("accuracy")
    if floor is None and tg.get("max_accuracy_drop") is not None:
        floor = t["accuracy"] - tg["max_accuracy_drop"] / 100  # the drop is in points
    if floor is not None:
        ax.axhline(floor, ls=":", color="gray", label="accuracy target")
    ax.set_xlabel("p99 latency, ms (ONNX Runtime, batch 1)")
    ax.set_ylabel("validation accuracy (exported model)")
    ax.set_title(f"{report['name']}: accuracy vs p99")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _or_dash(value: Any) -> str:
    return "—" if value is None else str(value)


def render_model_card(report: dict[str, Any]) -> str:
    """``MODEL_CARD.md``: what a serving team needs to know about ``student.onnx``."""
    s, t, tg, env, inp = (report["student"], report["teacher"], report["targets"],
                          report["environment"], report["input"])
    lat = s.get("latency_ms") or {}
    pre = "\n".join(f"  - {k}: {v}" for k, v in (inp.get("preprocessing") or {}).items())
    labels = inp.get("labels") or []
    lines = [
        f"# Model card: {report['name']} student",
        "",
        "## Model",
        f"- File: `student.onnx` ({s['format']}, {s['size_mb']:.3f} MB, "
        f"{s.get('params') or 'n/a'} parameters, {s.get('macs') or 'n/a'} MACs per sample), "
        f"from epoch {report['delivered']['epoch']}: {report['delivered']['reason']}.",
        f"- Distilled from a teacher of {t.get('params') or 'n/a'} parameters "
        f"(accuracy {t['accuracy']:.4f}).",
        "",
        "## Input and output",
        f"- Input `{inp.get('name')}`: shape {inp.get('shape')}, {inp.get('dtype')}; the batch "
        "axis is dynamic.",
        "- Preprocessing (apply exactly this before inference):",
        pre or "  - none recorded",
        f"- Output `logits`: shape [batch, {len(labels)}]; argmax gives the class. Labels in "
        f"order: {', '.join(map(str, labels))}.",
        "",
        "## Performance (measured on the exported model in ONNX Runtime)",
        f"- Validation accuracy {s['accuracy']:.4f}; test accuracy "
        f"{s.get('test_accuracy', float('nan')):.4f}; teacher validation accuracy "
        f"{t['accuracy']:.4f} (drop {report['accuracy_drop']:.2f} points).",
        f"- Latency at batch 1: p50 {lat.get('p50', float('nan')):.3f} ms, p95 "
        f"{lat.get('p95', float('nan')):.3f} ms, p99 {lat.get('p99', float('nan')):.3f} ms; "
        f"{s.get('throughput_qps', 'n/a')} samples/s; speed-up over the teacher at p99: "
        f"{report['speedup_p99']}×.",
        f"- Machine: {env['cpu']} ({env.get('cores')} cores), {env['provider']} provider, "
        f"{env['threads']} intra-op thread(s), ONNX Runtime {env['onnxruntime']}.",
        f"- Targets: accuracy {_or_dash(tg['accuracy'])}, max drop "
        f"{_or_dash(tg['max_accuracy_drop'])} points, p99 {_or_dash(tg['p99_ms'])} ms, size "
        f"{_or_dash(tg['size_mb'])} MB: "
        + (f"met at epoch {tg['met_at_epoch']}." if tg["met"] else "not met."),
        "",
        "## How it was produced",
        f"- Recipe `{report['name']}` (sha256 prefix {report['recipe_sha256']}; the resolved "
        "recipe is `recipe.yaml` beside this file).",
        f"- distill {env['distill']} (git {env.get('git_commit') or 'unknown'}), torch "
        f"{env['torch']}, ONNX Runtime {env['onnxruntime']}, Python {env.get('python')}.",
        "",
        "## Limitations",
        "- Accuracy is measured on the recipe's validation/test split only; it says nothing "
        "about inputs from another distribution (other scanners, resolutions, preprocessing).",
        "- Latency holds for the machine, provider and thread count above; re-measure on the "
        "serving hardware (`distill bench student.onnx`) and under load "
        "(`distill serve-bench`).",
        "- The student inherits the teacher's errors and biases; distillation does not fix them.",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path, report: dict[str, Any], trainer: Any = None) -> None:
    atomic_write_json(run_dir / "report.json", report)
    plot_pareto(report, run_dir / "pareto.png")
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    atomic_write_text(run_dir / "MODEL_CARD.md", render_model_card(report))
    if trainer is not None:
        _log_to_wandb(trainer, report, run_dir)


def _log_to_wandb(trainer: Any, report: dict[str, Any], run_dir: Path) -> None:
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        cols = ["epoch", "val_accuracy", "val_accuracy_onnx", "p50_ms", "p99_ms", "sparsity",
                "quantized", "size_mb"]
        logger.log_table(key="epochs", columns=cols,
                         data=[[r.get(c) for c in cols] for r in report["epochs"]])
        logger.log_image(key="pareto", images=[str(run_dir / "pareto.png")])
        summary = logger.experiment.summary
        summary["teacher/accuracy"] = report["teacher"]["accuracy"]
        summary["student/accuracy"] = report["student"]["accuracy"]
        summary["student/p99_ms"] = report["student"].get("latency_ms", {}).get("p99")
        summary["targets/met"] = report["targets"]["met"]
        summary["speedup_p99"] = report["speedup_p99"]
        summary["accuracy_drop"] = report["accuracy_drop"]
        # The delivered model as a W&B model artifact: uploaded online; offline it is staged
        # under WANDB_DATA_DIR (the run directory's wandb-data/) until `wandb sync`.
        import wandb

        artifact = wandb.Artifact(f"{report['name']}-student", type="model",
                                  metadata={"accuracy": report["student"]["accuracy"],
                                            "latency_ms": report["student"].get("latency_ms"),
                                            "format": report["student"]["format"]})
        artifact.add_file(str(run_dir / "student.onnx"), name="student.onnx")
        artifact.add_file(str(run_dir / "report.json"), name="report.json")
        logger.experiment.log_artifact(artifact, aliases=["latest", "delivered"])
