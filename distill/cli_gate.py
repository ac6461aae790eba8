"""``distill gate REPORT.json``: deployment gates of a release checklist, for CI/CD.

Exit 0 when every gate passes, 3 when one fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from distill.errors import TargetsNotMet, UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("report", help="a report.json written by `distill train`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--accuracy", type=float, help="minimum student accuracy, in [0, 1]")
    g.add_argument("--max-accuracy-drop", type=float,
                   help="maximum accuracy drop below the teacher, in points")
    p.add_argument("--p99-ms", type=float, help="latency SLO: maximum student p99 in ms")
    p.add_argument("--size-mb", type=float, help="maximum size of student.onnx in MB")
    p.add_argument("--json", action="store_true", help="print the gate table as JSON")


def load_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"report not found: '{path}'")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"report '{path}' is not JSON: {exc}") from None
    if not isinstance(report, dict) or not {"teacher", "student"} <= set(report):
        raise UserError(f"report '{path}' is not a distill report (no teacher/student)")
    return report


def evaluate_gates(report: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per requested gate: ``{gate, threshold, value, passed}`` (a pure function)."""
    s, t = report["student"], report["teacher"]
    rows = []

    def add(name: str, threshold: float, value: float | None, ok: bool) -> None:
        rows.append({"gate": name, "threshold": threshold, "value": value,
                     "passed": bool(value is not None and ok)})

    if args.accuracy is not None:
        if not 0 <= args.accuracy <= 1:
            raise UserError(f"--accuracy must be in [0, 1]; got {args.accuracy}")
        add("accuracy >=", args.accuracy, s.get("accuracy"),
            s.get("accuracy") is not None and s["accuracy"] >= args.accuracy)
    if args.max_accuracy_drop is not None:
        drop = 100 * (t["accuracy"] - s["accuracy"])
        add("accuracy drop (points) <=", args.max_accuracy_drop, round(drop, 3),
            drop <= args.max_accuracy_drop)
    if args.p99_ms is not None:
        if args.p99_ms <= 0:
            raise UserError(f"--p99-ms must be > 0; got {args.p99_ms}")
        p99 = (s.get("latency_ms") or {}).get("p99")
        add("p99 ms <=", args.p99_ms, p99, p99 is not None and p99 <= args.p99_ms)
    if args.size_mb is not None:
        if args.size_mb <= 0:
            raise UserError(f"--size-mb must be > 0; got {args.size_mb}")
        add("size MB <=", args.size_mb, s.get("size_mb"),
            s.get("size_mb") is not None and s["size_mb"] <= args.size_mb)
    if not rows:
        raise UserError("no gate given: pass --accuracy/--max-accuracy-drop, --p99-ms or --size-mb")
    return rows


def run(args: argparse.Namespace) -> int:
    report = load_report(Path(args.report))
    rows = evaluate_gates(report, args)
    if args.json:
        print(json.dumps({"gates": rows, "passed": all(r["passed"] for r in rows)}, indent=2))
    else:
        print(f"{'gate':<28} {'threshold':>10} {'value':>10}  result")
        for r in rows:
            value = "n/a" if r["value"] is None else f"{r['value']:.4g}"
            print(f"{r['gate']:<28} {r['threshold']:>10.4g} {value:>10}  "
                  f"{'PASS' if r['passed'] else 'FAIL'}")
    failed = [r["gate"] for r in rows if not r["passed"]]
    if failed:
        raise TargetsNotMet(f"{len(failed)} of {len(rows)} gate(s) failed: {', '.join(failed)}")
    return 0
