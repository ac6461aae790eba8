"""One run, one table: every comparison of distill measured side by side on this machine.

Sections (each a table in ``benchmark.md`` and a key in ``benchmark.json``):
  a. framework overhead: samples/s of distill's KD step (Lightning) vs a hand-written loop
  b. teacher-output caching (offline KD) on vs off
  c. per-epoch export + measure cost as a share of the epoch
  d. KD vs scratch student accuracy (seeds, mean ± std)        -> scripts/kd_vs_scratch.py
  e. INT8: FP32 vs ORT static INT8 vs our PTQ vs our QAT         -> scripts/bench_int8.py
  f. structured pruning sweep 0/25/50/75%                        -> scripts/bench_pruning.py
  g. end to end: teacher vs the delivered student of digits_full.yaml

Usage:
    python scripts/benchmark.py [--quick] [--out DIR] [--only a,b,...]

``--quick`` shrinks every section (tiny models, one seed, few epochs) so that the test suite
can check that the whole pipeline runs; its numbers are not meaningful.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@functools.cache
def _script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def environment() -> dict[str, Any]:
    import onnxruntime as ort
    import pytorch_lightning as pl
    import torch

    from distill.perf import allocator_tuned
    from distill.report import _cpu_name

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            "lightning": pl.__version__, "python": platform.python_version(),
            "malloc": "tuned" if allocator_tuned() else "system"}


# ----- a/b: training throughput --------------------------------------------------------------
def _models(quick: bool) -> tuple[Any, Any, Any, Any]:
    import torch

    from distill.data import DigitsDataModule
    from distill.models import build_model

    size = 8 if quick else 32
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, image_size=size)
    dm.prepare()
    if quick:
        teacher = build_model("resnet", 1, 10, widths=(8, 16), blocks=1)
        student = build_model("resnet", 1, 10, widths=(4, 8), blocks=1)
    else:
        teacher = build_model("resnet_teacher", 1, 10)
        student = build_model("resnet_student", 1, 10)
    return dm, teacher.eval().requires_grad_(False), student, torch.zeros(1, 1, size, size)


class HandWrittenKD:
    """The reference: a minimal PyTorch KD loop (same loss, optimizer, data, batch size)."""

    def __init__(self, dm: Any, teacher: Any, student: Any) -> None:
        import torch

        self.dm, self.teacher, self.student = dm, teacher, student
        self.opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=1e-4)

    def epoch(self) -> float:
        """One training epoch; returns its seconds."""
        import torch
        import torch.nn.functional as F

        from distill.losses import kd_loss

        self.student.train()
        t0 = time.perf_counter()
        for x, y in self.dm.train_dataloader():
            with torch.no_grad():
                t = self.teacher(x)
            s = self.student(x)
            loss = F.cross_entropy(s, y) + kd_loss(s, t, 4.0)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - t0


def distill_epochs(dm: Any, teacher: Any, student: Any, example: Any, epochs: int,
                   cache: bool = False, between: Any = None) -> list[float]:
    """distill's DistillationModule on Lightning's Trainer, timed per training epoch.

    ``between``, if given, is called after every timed epoch (outside the timed span).
    """
    import pytorch_lightning as pl

    from distill.module import DistillationModule

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, *_: Any) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, *_: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)
            if between is not None:
                between()

    module = DistillationModule(student, teacher, 10, example,
                                distill={"kd": {"weight": 1.0, "temperature": 4.0},
                                         "cache_teacher": cache},
                                optim={"name": "adamw", "lr": 3e-3, "scheduler": "none"})
    timer = EpochTimer()
    pl.Trainer(max_epochs=epochs, callbacks=[timer], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               num_sanity_val_steps=0).fit(module, datamodule=dm)
    return timer.times


def section_overhead(quick: bool) -> dict[str, Any]:
    import copy

    dm, teacher, student, example = _models(quick)
    n = len(dm.dataset("train"))
    epochs = 3 if quick else 16
    # Epochs interleave: after every distill epoch (Lightning) one epoch of the hand-written
    # loop runs, each on its own copy of the student; the figure is the median of the pairs'
    # ratios, so a slow spell of this shared machine hits both sides of a pair, not one side.
    ref = HandWrittenKD(dm, teacher, copy.deepcopy(student))
    ref_times: list[float] = []
    ours = distill_epochs(dm, teacher, copy.deepcopy(student), example, epochs,
                          between=lambda: ref_times.append(ref.epoch()))
    pairs = list(zip(ref_times[1:], ours[1:]))  # epoch 0 of each is warm-up
    ratios = sorted(r / o for r, o in pairs)
    return {"samples": n, "hand_written_sps": round(n / statistics.median(ref_times[1:]), 1),
            "distill_sps": round(n / statistics.median(ours[1:]), 1),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_q1": round(ratios[len(ratios) // 4], 3),
            "ratio_q3": round(ratios[(3 * len(ratios)) // 4], 3),
            "pairs": len(pairs)}


def section_caching(quick: bool) -> dict[str, Any]:
    import copy

    dm, teacher, student, example = _models(quick)
    n = len(dm.dataset("train"))
    epochs = 3 if quick else 4
    off = distill_epochs(dm, teacher, copy.deepcopy(student), example, epochs, cache=False)
    on = distill_epochs(dm, teacher, copy.deepcopy(student), example, epochs, cache=True)
    # epoch 0 fills the cache (the teacher runs once per sample); later epochs hit it
    off_sps = n / statistics.median(off[1:])
    on_sps = n / statistics.median(on[1:])
    return {"off_sps": round(off_sps, 1), "on_sps": round(on_sps, 1),
            "speedup": round(on_sps / off_sps, 3),
            "total_s_off": round(sum(off), 2), "total_s_on": round(sum(on), 2),
            "speedup_whole_run": round(sum(off) / sum(on), 3), "epochs": epochs}


# ----- c/g: runs of the real pipeline --------------------------------------------------------
TINY = ["data.image_size=8", "teacher.name=resnet", "teacher.kwargs={widths: [8, 16], blocks: 1}",
        "student.name=resnet", "student.kwargs={widths: [4, 8], blocks: 1}",
        "teacher.train_epochs=1", "export.iters=20", "export.warmup=2"]


def _run(recipe: str, overrides: list[str], out: Path) -> dict[str, Any]:
    from distill.config import load_recipe
    from distill.run import train

    cfg = load_recipe(recipe, [*overrides, f"output_dir={out}", "logger.wandb=false",
                               "trainer.enable_progress_bar=false"])
    return train(cfg).report


def section_export_cost(quick: bool, tmp: Path) -> dict[str, Any]:
    extra = [*TINY, "trainer.max_epochs=2"] if quick else ["trainer.max_epochs=4"]
    rep = _run("digits_kd", [*extra, "targets.p99_ms=null", "targets.max_accuracy_drop=null",
                             "teacher.cache_dir=runs/_teachers"], tmp / "export_cost")
    rows = [r for r in rep["epochs"] if r.get("export_s") is not None]
    # measure_s is the whole step (export + parity + ORT accuracy + latency)
    share = [r["measure_s"] / r["epoch_s"] for r in rows if r.get("epoch_s")]
    return {
        "epochs": len(rows),
        "export_s": round(statistics.median(r["export_s"] for r in rows), 3),
        "measure_s": round(statistics.median(r["measure_s"] for r in rows), 3),
        "epoch_s": round(statistics.median(r["epoch_s"] for r in rows if r.get("epoch_s")), 3)
        if share else None,
        "share": round(statistics.median(share), 3) if share else None,
    }


def section_end_to_end(quick: bool, tmp: Path) -> dict[str, Any]:
    # quick: every stage runs once (targets off, so no early stop before the QAT epoch)
    extra = [*TINY, "trainer.max_epochs=3", "prune.start_epoch=0", "prune.end_epoch=1",
             "qat.start_epoch=2", "targets.size_mb=null", "targets.p99_ms=null",
             "targets.max_accuracy_drop=null"] if quick else []
    rep = _run("digits_full", [*extra, "teacher.cache_dir=runs/_teachers"], tmp / "full")
    t, s = rep["teacher"], rep["student"]
    keys = ("accuracy", "params", "macs", "size_mb", "format")
    return {"teacher": {**{k: t.get(k) for k in keys}, **t.get("latency_ms", {})},
            "student": {**{k: s.get(k) for k in keys}, **s.get("latency_ms", {})},
            "speedup_p99": rep["speedup_p99"], "accuracy_drop": rep["accuracy_drop"],
            "targets_met": rep["targets"]["met"], "epochs": len(rep["epochs"]),
            "met_at_epoch": rep["targets"]["met_at_epoch"],
            "pruned_epochs": sum(1 for r in rep["epochs"] if (r.get("sparsity") or 0) > 0),
            "quantized_epochs": sum(1 for r in rep["epochs"] if r.get("quantized")),
            "fp32_kept": (tmp / "full" / "student_fp32.onnx").is_file()}


# ----- d/e/f: the dedicated scripts ----------------------------------------------------------
def section_script(name: str, argv: list[str], tmp: Path) -> Any:
    out = tmp / f"{name}.json"
    code = _script(name).main([*argv, "--json", str(out)])
    if code:
        raise RuntimeError(f"{name} exited with {code}")
    return json.loads(out.read_text())


def sections(quick: bool, tmp: Path) -> dict[str, Any]:
    kd = (["--seeds", "0", "--epochs", "1", *TINY] if quick
          else ["--seeds", "0", "1", "2"])
    int8 = (["--epochs", "1", "--qat-epochs", "1", "--iters", "50", "--warmup", "5"] if quick
            else [])
    prune = (["--epochs", "1", "--finetune", "1", "--ratios", "0", "0.5", "--rounds", "1",
              "--iters", "30"] if quick else [])
    return {
        "a": ("framework overhead", lambda: section_overhead(quick)),
        "b": ("teacher-output caching", lambda: section_caching(quick)),
        "c": ("export + measure cost per epoch", lambda: section_export_cost(quick, tmp)),
        "d": ("KD vs scratch", lambda: section_script("kd_vs_scratch", kd, tmp)),
        "e": ("INT8", lambda: section_script("bench_int8", int8, tmp)),
        "f": ("pruning sweep", lambda: section_script("bench_pruning", prune, tmp)),
        "g": ("end to end (digits_full)", lambda: section_end_to_end(quick, tmp)),
    }


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "—" if v is None else str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(cell(v) for v in r) + " |" for r in rows], ""]


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def render_section(key: str, r: Any) -> list[str]:
    """One section's result as a markdown table."""
    if key == "a":
        return _table(["loop", "samples/s"], [["hand-written PyTorch KD", r["hand_written_sps"]],
                                              ["distill (Lightning)", r["distill_sps"]],
                                              ["ratio distill / hand-written (median of "
                                               f"{r['pairs']} interleaved epoch pairs; "
                                               f"quartiles {r['ratio_q1']}–{r['ratio_q3']})",
                                               r["ratio"]]])
    if key == "b":
        return _table(["teacher outputs", "samples/s (epochs ≥ 1)", "whole run s"],
                      [["computed every step", r["off_sps"], r["total_s_off"]],
                       ["cached (offline KD)", r["on_sps"], r["total_s_on"]],
                       ["speed-up", r["speedup"], r["speedup_whole_run"]]])
    if key == "c":
        return _table(["epochs", "export s", "export+parity+ORT accuracy+latency s",
                       "epoch s (train+val)", "share of epoch"],
                      [[r["epochs"], r["export_s"], r["measure_s"], r["epoch_s"], r["share"]]])
    if key == "d":
        return _table(["student", "val accuracy %", "test accuracy %"],
                      [[m, _mean_std([x["val"] for x in r[m]]),
                        _mean_std([x["test"] for x in r[m]])] for m in ("scratch", "kd")]
                      + [["teacher", f"{100 * r['teacher']['accuracy']:.2f}", "—"]])
    if key == "e":
        rows = r["rows"]
        return _table(["model", "accuracy %", "p50 ms", "p99 ms", "size MB", "float Conv/Gemm",
                       "int8 ops"],
                      [[n, 100 * v["accuracy"], v["p50"], v["p99"], v["size_mb"],
                        v["float_compute"], v["int8_compute"]] for n, v in rows.items()])
    if key == "f":
        return _table(["variant", "test accuracy %", "params", "MACs", "p50 ms", "p99 ms"],
                      [[n, 100 * v["accuracy"], v["params"], v["macs"], v["p50"], v["p99"]]
                       for n, v in r.items()])
    if key == "g":
        t, s = r["teacher"], r["student"]
        cols = ["accuracy", "p50", "p99", "size_mb", "params", "macs", "format"]
        return _table(["model", *cols], [["teacher", *[t.get(c) for c in cols]],
                                         ["student (delivered)", *[s.get(c) for c in cols]]]) + [
            f"speed-up p99 {r['speedup_p99']}×, accuracy drop {r['accuracy_drop']} points, "
            f"targets met: {r['targets_met']} (epoch {r.get('met_at_epoch')}), "
            f"{r['epochs']} epochs.", ""]
    return ["```json", json.dumps(r, indent=1, default=str), "```", ""]


def acceptance(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of the issues, checked on this run: ``[{section, check, passed}, ...]``.

    Speed goals are ratios measured side by side in this run, so they mean something only on
    a full run (``--quick`` uses toy models: its verdicts are not meaningful).
    """
    got = {k: s["result"] for k, s in results["sections"].items() if "result" in s}
    out: list[tuple[str, str, bool]] = []
    if "a" in got:
        r = got["a"]["ratio"]
        out += [("a", f"distill / hand-written samples/s = {r} (>= 0.90; goal 0.95)", r >= 0.90)]
    if "b" in got:
        sp = got["b"]["speedup"]
        out += [("b", f"teacher-output caching speed-up = {sp}x (> 1)", sp > 1.0)]
    if "e" in got:
        e = got["e"]
        checks = _script("bench_int8").acceptance(e["rows"], e["fake_quant_accuracy"],
                                                  e["qat_top1_agreement"])
        out += [("e", text, ok) for text, ok in checks]
    if "f" in got:
        out += [("f", text, ok) for text, ok in _script("bench_pruning").acceptance(got["f"])]
    if "g" in got:
        g = got["g"]
        out += [("g", f"digits_full delivers {g['student'].get('format')}, targets met: "
                 f"{g['targets_met']}", bool(g["targets_met"])
                 and g["student"].get("format") == "onnx-int8-qdq")]
    return [{"section": k, "check": text, "passed": bool(ok)} for k, text, ok in out]


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# distill benchmark{' (quick: numbers not meaningful)' if results['quick'] else ''}",
             "", f"Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']} "
             f"({env['torch_threads']} threads), ONNX Runtime {env['onnxruntime']}, Lightning "
             f"{env['lightning']}; malloc {env['malloc']} (distill.perf). "
             f"Total {results['seconds']:.0f} s.", ""]
    for key, sec in results["sections"].items():
        lines.append(f"## {key}. {sec['title']} ({sec['seconds']:.0f} s)")
        lines.append("")
        if "error" in sec:
            lines += [f"failed: {sec['error']}", ""]
            continue
        try:
            lines += render_section(key, sec["result"])
        except (KeyError, TypeError, ValueError):  # a script changed its output: show it raw
            lines += ["```json", json.dumps(sec["result"], indent=1, default=str), "```", ""]
    checks = results.get("acceptance") or []
    if checks:
        note = " (quick: toy models, verdicts not meaningful)" if results["quick"] else ""
        lines += [f"## Acceptance{note}", ""]
        lines += [f"- [{'PASS' if c['passed'] else 'FAIL'}] ({c['section']}) {c['check']}"
                  for c in checks]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/benchmark")
    p.add_argument("--only", default="a,b,c,d,e,f,g")
    args = p.parse_args(argv)
    import torch

    from distill.perf import tune_allocator

    tune_allocator()  # as `distill train` does; it applies to both loops of section a
    torch.set_num_threads(int(os.environ.get("DISTILL_BENCH_THREADS", "0")) or
                          torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"quick": args.quick, "environment": environment(),
                               "sections": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        table = sections(args.quick, Path(tmp))
        for key in args.only.split(","):
            title, fn = table[key]
            t0 = time.perf_counter()
            print(f"[{key}] {title} ...", file=sys.stderr, flush=True)
            try:
                sec = {"title": title, "result": fn()}
            except Exception as exc:  # one failing section must not hide the others
                sec = {"title": title, "error": f"{type(exc).__name__}: {exc}"}
            sec["seconds"] = round(time.perf_counter() - t0, 1)
            results["sections"][key] = sec
    results["seconds"] = round(time.perf_counter() - started, 1)
    try:
        results["acceptance"] = acceptance(results)
    except (KeyError, TypeError, ValueError) as exc:  # a script changed its output
        results["acceptance_error"] = f"{type(exc).__name__}: {exc}"
    from distill.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "benchmark.json", results)
    text = render(results)
    atomic_write_text(out / "benchmark.md", text)
    print(text)
    return 1 if any("error" in s for s in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
