"""``distill gate REPORT.json``: exit 0 when every gate passes, 3 when one fails, 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.cli import main


@pytest.fixture
def report(tmp_path):
    """A report with the keys ``distill train`` writes (documented in the README)."""
    data = {
        "version": 1, "name": "digits_kd",
        "teacher": {"accuracy": 0.98, "latency_ms": {"p50": 2.0, "p95": 2.4, "p99": 2.6,
                                                     "mean": 2.1},
                    "size_mb": 1.2, "format": "onnx-fp32"},
        "student": {"accuracy": 0.97, "latency_ms": {"p50": 0.5, "p95": 0.6, "p99": 0.7,
                                                     "mean": 0.52},
                    "size_mb": 0.3, "format": "onnx-fp32", "epoch": 4},
        "epochs": [], "targets": {"met": True, "met_at_epoch": 4},
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    return path


def test_every_gate_passes_exit_0(report, capsys):
    code = main(["gate", str(report), "--accuracy", "0.95", "--p99-ms", "1.0",
                 "--size-mb", "0.5"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split()[-1] for line in out[1:]] == ["PASS", "PASS", "PASS"]
    assert out[2].split()[:2] == ["p99", "ms"] and out[2].split()[-2] == "0.7"


def test_one_failed_gate_exit_3_names_it(report, capsys):
    code = main(["gate", str(report), "--max-accuracy-drop", "0.5", "--p99-ms", "1.0"])
    captured = capsys.readouterr()
    assert code == 3
    assert captured.err.strip() == ("gate failed: 1 of 2 gate(s) failed: "
                                    "accuracy drop (points) <=")
    drop, p99 = captured.out.splitlines()[1:]
    assert drop.split()[-3:] == ["0.5", "1", "FAIL"]  # 100 * (0.98 - 0.97) points
    assert p99.split()[-1] == "PASS"


def test_json_output_and_missing_latency_fails(report, capsys):
    data = json.loads(report.read_text())
    del data["student"]["latency_ms"]
    report.write_text(json.dumps(data))
    assert main(["gate", str(report), "--p99-ms", "5", "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out == {"gates": [{"gate": "p99 ms <=", "threshold": 5.0, "value": None,
                              "passed": False}], "passed": False}


@pytest.mark.parametrize(("make", "args", "message"), [
    ("missing", ["--accuracy", "0.9"], r"error: report not found: '.*nope\.json'"),
    ("not_distill", ["--accuracy", "0.9"],
     r"error: report '.*other\.json' is not a distill report \(no teacher/student\)"),
    ("report", ["--accuracy", "1.5"], r"error: --accuracy must be in \[0, 1\]; got 1\.5"),
    ("report", ["--p99-ms", "0"], r"error: --p99-ms must be > 0; got 0\.0"),
    ("report", [], r"error: no gate given: pass --accuracy/--max-accuracy-drop, --p99-ms"),
    ("report", ["--accuracy", "x"], r"error: argument --accuracy: invalid float value: 'x'"),
])
def test_bad_input_exit_2_one_line(report, tmp_path, capsys, make, args, message):
    import re

    paths = {"report": report, "missing": tmp_path / "nope.json",
             "not_distill": tmp_path / "other.json"}
    paths["not_distill"].write_text(json.dumps({"loss": 0.1}))
    try:
        code = main(["gate", str(paths[make]), *args])
    except SystemExit as exc:  # argparse's own errors exit 2 with usage + one error line
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert re.fullmatch(message + ".*", err[-1]), err
    assert len([line for line in err if line.startswith("error:")]) == 1


def test_console_script_exit_codes(report, tmp_path):
    exe = str(Path(sys.executable).with_name("distill"))
    ok = subprocess.run([exe, "gate", str(report), "--accuracy", "0.9"], capture_output=True,
                        text=True, timeout=60)
    bad = subprocess.run([exe, "gate", str(report), "--accuracy", "0.99"], capture_output=True,
                         text=True, timeout=60)
    assert (ok.returncode, bad.returncode) == (0, 3), (ok.stderr, bad.stderr)
    assert "Traceback" not in bad.stderr and bad.stderr.startswith("gate failed: 1 of 1")
