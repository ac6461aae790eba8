"""KD vs. training from scratch: the same student, epochs and data, with and without the teacher.

Prints one table (mean ± std over seeds) of the exported student's validation and test
accuracy in ONNX Runtime, beside the teacher's. Usage:

    python scripts/kd_vs_scratch.py [--seeds 0 1 2] [--epochs 12] [RECIPE] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


def run_once(recipe: str | None, overrides: list[str], out: Path) -> dict:
    from distill.config import load_recipe
    from distill.run import train

    cfg = load_recipe(recipe, [*overrides, f"output_dir={out}", "logger.wandb=false",
                               "export.enabled=false", "trainer.enable_progress_bar=false"])
    return train(cfg).report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="student epochs (recipe default)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("items", nargs="*", help="[RECIPE] [key=value ...]")
    args = p.parse_args(argv)
    items = list(args.items)
    recipe = items.pop(0) if items and "=" not in items[0] else None
    if args.epochs:
        items.append(f"trainer.max_epochs={args.epochs}")
    results: dict[str, list[dict]] = {"scratch": [], "kd": []}
    teacher = None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in ("scratch", "kd"):
                # The teacher has its own seed (teacher.seed): it is the same for every student
                # seed; only the student's initialisation and data order change.
                extra = [f"seed={seed}", "teacher.cache_dir=runs/_teachers"]
                if mode == "scratch":
                    extra += ["distill.kd.weight=0", "distill.feature.weight=0",
                              "distill.attention.weight=0", "distill.dkd.weight=0"]
                rep = run_once(recipe, items + extra, Path(tmp) / f"{mode}-{seed}")
                teacher = rep["teacher"]
                results[mode].append({"seed": seed, "val": rep["student"]["accuracy"],
                                      "test": rep["student"]["test_accuracy"]})
                print(f"seed {seed} {mode:<7} val {rep['student']['accuracy']:.4f} "
                      f"test {rep['student']['test_accuracy']:.4f}", file=sys.stderr)

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"

    print(f"\n| student ({len(args.seeds)} seeds) | val accuracy % | test accuracy % |")
    print("|---|---|---|")
    for mode in ("scratch", "kd"):
        rows = results[mode]
        print(f"| {mode} | {ms([r['val'] for r in rows])} | {ms([r['test'] for r in rows])} |")
    assert teacher is not None
    print(f"| teacher | {100 * teacher['accuracy']:.2f} | — |")
    if args.json:
        Path(args.json).write_text(json.dumps({"teacher": teacher, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
