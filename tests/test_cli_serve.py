"""``distill serve-bench``: flags, the fixed-batch rule, the JSON report and the sweep search."""

from __future__ import annotations

import json
import re

import pytest

from distill.cli import main
from distill.cli_serve import search_max_rate
from tests.export.test_serving import make_identity_onnx


@pytest.fixture(scope="module")
def ident(tmp_path_factory) -> str:
    return make_identity_onnx(tmp_path_factory.mktemp("cli_serve") / "ident.onnx")


FAST = ["--duration", "0.2", "--qps", "200", "--slo-p99-ms", "500"]

BAD = {
    "qps zero": (["--qps", "0"], r"^error: --qps must be > 0; got 0.0$"),
    "qps nan": (["--qps", "nan"], r"^error: --qps must be > 0; got nan$"),
    "duration negative": (["--duration", "-1"], r"^error: --duration must be > 0; got -1.0$"),
    "max batch zero": (["--max-batch", "0"], r"^error: --max-batch must be >= 1; got 0$"),
    "max wait negative": (["--max-wait-ms", "-2"], r"^error: --max-wait-ms must be >= 0; got -2"),
    "threads zero": (["--threads", "0"], r"^error: --threads must be >= 1; got 0$"),
    "slo zero": (["--slo-p99-ms", "0"], r"^error: --slo-p99-ms must be > 0; got 0.0$"),
    "rounds zero": (["--rounds", "0"], r"^error: --rounds must be >= 1; got 0$"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flags_are_one_line_exit_2(case, ident, capsys):
    flags, message = BAD[case]
    assert main(["serve-bench", ident, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.match(message, err), err


def test_missing_and_non_onnx_files_exit_2(tmp_path, capsys):
    assert main(["serve-bench", str(tmp_path / "nope.onnx"), *FAST]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ONNX file not found:")
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["serve-bench", str(tmp_path / "notes.txt"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "notes.txt: not a loadable ONNX model" in err and len(err.splitlines()) == 1


def test_json_report_has_three_strategies(ident, capsys):
    assert main(["serve-bench", ident, *FAST, "--max-batch", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs_source"] == "random normal"  # a (4,) input is no image
    assert list(report["strategies"]) == ["none", "static", "dynamic"]
    for r in report["strategies"].values():
        assert r["submitted"] == 40 and r["max_batch"] <= 4
        assert {"p50_ms", "p95_ms", "p99_ms", "achieved_qps", "slo_met", "batch_hist"} <= set(r)


def test_table_shows_each_strategy_and_the_slo(ident, capsys):
    assert main(["serve-bench", ident, *FAST]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert {"none", "static", "dynamic"} <= set(rows)
    assert rows["none"].split()[1] == "1"  # batch column
    assert " met " in rows["none"] or " MISS " in rows["none"]


def test_fixed_batch_model_explicit_batching_is_a_user_error(tmp_path, capsys):
    fixed = make_identity_onnx(tmp_path / "fixed.onnx", batch=1)
    assert main(["serve-bench", fixed, *FAST, "--max-batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "error: --max-batch 8: " in err and "has a fixed batch axis (1)" in err
    assert main(["serve-bench", fixed, *FAST, "--max-wait-ms", "1"]) == 2
    assert "error: --max-wait-ms 1: " in capsys.readouterr().err


def test_fixed_batch_model_without_batching_flags_is_served_unbatched(tmp_path, capsys):
    fixed = make_identity_onnx(tmp_path / "fixed.onnx", batch=1)
    assert main(["serve-bench", fixed, *FAST]) == 0
    out = capsys.readouterr().out
    assert "note: batch axis is fixed at 1: served without batching" in out
    assert "dynamic  skipped:" in out and "static   skipped:" in out


def test_digits_inputs_for_an_image_model(tmp_path, capsys):
    model = make_identity_onnx(tmp_path / "img.onnx", sample=(1, 8, 8))
    assert main(["serve-bench", model, *FAST, "--inputs", "digits", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs_source"].startswith("digits validation split (")
    assert main(["serve-bench", str(make_identity_onnx(tmp_path / "v.onnx")), *FAST,
                 "--inputs", "digits"]) == 2
    assert "--inputs digits needs a 1xSxS float input" in capsys.readouterr().err


def test_sweep_reports_a_rate_per_strategy_and_a_recommendation(ident, capsys):
    args = ["serve-bench", ident, *FAST, "--sweep", "--sweep-steps", "2", "--sweep-trial-s",
            "0.05", "--json"]
    assert main(args) == 0
    sweep = json.loads(capsys.readouterr().out)["sweep"]
    assert sweep["trial_s"] == 0.05
    for s in sweep["strategies"].values():
        assert 1 <= len(s["trials"]) <= 2
    rec = sweep["recommendation"]
    assert len(rec["grid"]) == 12
    assert rec["best"] is None or rec["best"]["slo_met"] is True


def test_search_doubles_then_bisects_to_the_threshold():
    best, trials = search_max_rate(lambda r: r <= 1000, start=100, max_steps=20)
    assert best is not None and 950 <= best <= 1000
    assert [r for r, _ in trials[:5]] == [100, 200, 400, 800, 1600]


def test_search_halves_when_the_start_fails_and_respects_max_steps():
    best, trials = search_max_rate(lambda r: r <= 30, start=100, max_steps=20)
    assert best is not None and 28.5 <= best <= 30
    assert [r for r, _ in trials[:3]] == [100, 50, 25]
    best, trials = search_max_rate(lambda r: False, start=100, max_steps=4)
    assert best is None and len(trials) == 4


def test_search_goes_up_first_for_static_batching():
    # static batching fails at low rates (filling a batch is slow) and at overload
    best, trials = search_max_rate(lambda r: 300 <= r <= 2000, start=100, max_steps=20,
                                   up_first=True)
    assert best is not None and 1900 <= best <= 2000
    assert [r for r, _ in trials[:3]] == [100, 200, 400]


@pytest.mark.parametrize("override, message", [
    ("serving.qps=0", r"'serving.qps' must be > 0; got 0.0"),
    ("serving.max_batch=0", r"'serving.max_batch' must be >= 1; got 0"),
    ("serving.max_wait_ms=-1", r"'serving.max_wait_ms' must be >= 0; got -1.0"),
])
def test_recipe_serving_section_is_validated(override, message):
    from distill.config import load_recipe
    from distill.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(None, [override])
