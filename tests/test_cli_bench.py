"""``distill bench``: table, JSON, profile, and one-line user errors (exit code 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from distill.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A real ONNX file: input[batch, 32] -> MatMul -> Relu -> logits[batch, 10]."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 10))
                                .astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["h"]),
         helper.make_node("Relu", ["h"], ["logits"])], "mm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path_factory.mktemp("bench") / "mm.onnx"
    onnx.save(proto, str(path))
    return path


FAST = ["--iters", "5", "--warmup", "1"]


def test_table_has_one_row_per_batch_size(model, capsys):
    assert main(["bench", str(model), "--batch", "1,4", *FAST]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "CPUExecutionProvider" in lines[0] and "1 intra-op / 1 inter-op threads" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["batch", "p50", "ms"])
    rows = [line.split() for line in lines[header + 2:] if line.strip()]
    assert [r[0] for r in rows] == ["1", "4"]
    p50, p95, p99 = (float(v) for v in rows[0][1:4])
    assert 0 < p50 <= p95 <= p99


def test_json_output_parses(model, capsys):
    assert main(["bench", str(model), "--batch", "2", "--json", *FAST]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == str(model)
    stats = data["results"]["2"]
    assert stats["batch_size"] == 2 and stats["iters"] == 5
    assert stats["p50_ms"] <= stats["p99_ms"]


def test_profile_shows_operator_types(model, capsys):
    assert main(["bench", str(model), "--profile", *FAST]) == 0
    out = capsys.readouterr().out
    assert "top operator types (ORT profiler)" in out
    assert "MatMul" in out or "Gemm" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "error: ONNX file not found: .*nope.onnx"),
        (["{text}"], "error: .*notes.onnx: not a loadable ONNX model"),
        (["{model}", "--provider", "quantum"], "error: unknown provider 'quantum'"),
        (["{model}", "--batch", "1,x"], "error: --batch expects comma-separated integers >= 1"),
        (["{model}", "--batch", "0"], "error: --batch expects comma-separated integers"),
        (["{model}", "--iters", "0"], "error: 'iters' must be >= 1; got 0"),
    ],
)
def test_user_errors_exit_2_with_one_line(model, tmp_path, capsys, args, message):
    text = tmp_path / "notes.onnx"
    text.write_text("hello\n")
    paths = {"missing": tmp_path / "nope.onnx", "text": text, "model": model}
    argv = ["bench", *FAST, *[a.format(**paths) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.match(message, err.strip())


def test_console_script_runs(model):
    exe = Path(sys.executable).parent / "distill"
    proc = subprocess.run([str(exe), "bench", str(model), "--json", *FAST],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"]["1"]["iters"] == 5
    bad = subprocess.run([str(exe), "bench", str(model) + ".missing"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: ONNX file not found")
