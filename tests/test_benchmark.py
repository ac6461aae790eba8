"""`scripts/benchmark.py --quick`: every section runs and reports sane, structured numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_benchmark_quick_runs_every_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # teacher cache and outputs stay in the test's folder
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--quick", "--out", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    errors = {k: s["error"] for k, s in results["sections"].items() if "error" in s}
    assert code == 0 and not errors, errors
    s = {k: v["result"] for k, v in results["sections"].items()}
    assert set(s) == set("abcdefg")
    assert s["a"]["hand_written_sps"] > 0 and s["a"]["distill_sps"] > 0 and s["a"]["ratio"] > 0
    assert s["a"]["ratio_q1"] <= s["a"]["ratio"] <= s["a"]["ratio_q3"] and s["a"]["pairs"] == 2
    assert s["b"]["on_sps"] > 0 and s["b"]["off_sps"] > 0
    assert 0 < s["c"]["share"] and s["c"]["epochs"] >= 1
    assert {"scratch", "kd", "teacher"} <= set(s["d"])
    assert all(0 <= r["val"] <= 1 for r in s["d"]["kd"] + s["d"]["scratch"])
    rows = s["e"]["rows"]
    assert {"fp32", "ours ptq", "ours qat"} <= set(rows)
    assert rows["ours qat"]["size_mb"] < rows["fp32"]["size_mb"]
    assert rows["ours qat"]["float_compute"] == 0 < rows["fp32"]["float_compute"]
    assert len(s["f"]) >= 2
    g = s["g"]
    assert g["student"]["params"] < g["teacher"]["params"]
    assert g["pruned_epochs"] >= 1 and g["quantized_epochs"] >= 1  # KD -> prune -> QAT ran
    assert g["fp32_kept"]  # student_fp32.onnx beside the INT8 student
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "## a. framework overhead" in md and "## g. end to end" in md
    # every goal is checked in the run itself (verdicts of a quick run are not asserted)
    checks = results["acceptance"]
    assert {c["section"] for c in checks} == set("abefg")
    assert all(isinstance(c["passed"], bool) and c["check"] for c in checks)
    assert sum(c["section"] == "e" for c in checks) == 8  # bench_int8's own list
    assert "## Acceptance (quick" in md and md.count("- [PASS]") + md.count("- [FAIL]") == len(
        checks)
