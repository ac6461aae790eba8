"""The bad-input table of the README: one clear line, the right exit code, nothing lost.

Extends ``tests/test_cli.py`` (recipe keys, types, model targets, a missing or mismatched
teacher, ``trainer.devices=0``, an ``output_dir`` that is a file) and
``tests/test_cli_bench.py`` (a missing or non-ONNX file, bad ``--batch``) with damaged files,
data paths, resume and launch mistakes. A mistake found before the run starts creates no run
directory; one about an existing run directory leaves it byte for byte as it was.

Targets that cannot be met are not an error (exit 0, "targets not met", the run goes to its
last epoch): ``tests/test_train_e2e.py::test_unreachable_p99_runs_to_the_end_and_says_so``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from onnx import TensorProto, helper

from distill.cli import main
from distill.models import build_model


def _fast(files: dict[str, Path], out: Path) -> list[str]:
    return [
        "data.image_size=8", "trainer.max_epochs=1", "export.enabled=false",
        "logger.wandb=false", f"teacher.checkpoint={files['teacher']}", "teacher.name=resnet",
        "teacher.kwargs={widths: [8, 16], blocks: 1}", f"output_dir={out}",
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Damaged and odd inputs, made once."""
    from distill.config import load_recipe, to_yaml

    d = tmp_path_factory.mktemp("inputs")
    torch.save(build_model("resnet", 1, 10, widths=(8, 16), blocks=1).state_dict(),
               d / "teacher.pt")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    data = model.SerializeToString()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (d / "syntax.yaml").write_text("name: broken\ndata: {name: digits\n")
    (d / "list.yaml").write_text("- trainer\n- data\n")
    (d / "report.json").write_text("{'teacher': 0.98,")  # Python, not JSON
    (d / "one_class" / "cats").mkdir(parents=True)
    (d / "no_batches").mkdir()
    # A run directory whose checkpoint was cut short (disk full, or copied half-way).
    run = d / "damaged_run"
    (run / "checkpoints").mkdir(parents=True)
    files = {"teacher": d / "teacher.pt", "run": run}
    cfg = load_recipe(None, _fast(files, run))
    (run / "recipe.yaml").write_text(to_yaml(cfg))
    ckpt = d / "full.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 3}, ckpt)
    (run / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes()[:2000])
    no_ckpt = d / "run_without_checkpoint"
    no_ckpt.mkdir()
    (no_ckpt / "recipe.yaml").write_text(to_yaml(cfg))
    return {**files, "dir": d, "no_ckpt": no_ckpt}


# case -> (argv with {placeholders}, exit code, the one stderr line (regex))
CASES: dict[str, tuple[list[str], int, str]] = {
    "recipe YAML syntax error": (
        ["train", "{dir}/syntax.yaml", "{fast}"], 2,
        r"error: recipe .*syntax\.yaml: cannot parse YAML: while parsing a flow mapping"),
    "recipe is not a mapping": (
        ["train", "{dir}/list.yaml", "{fast}"], 2,
        r"error: recipe .*list\.yaml: top level must be a mapping of sections"),
    "cifar10 root does not exist": (
        ["train", "{fast}", "data.name=cifar10", "data.root=/nope"], 2,
        r"error: data\.root does not exist: '/nope'"),
    "cifar10 root without batches": (
        ["train", "{fast}", "data.name=cifar10", "data.root={dir}/no_batches"], 2,
        r"error: no data_batch_\* files in data\.root '.*no_batches'"),
    "image folder with one class": (
        ["train", "{fast}", "data.name=image_folder", "data.root={dir}/one_class"], 2,
        r"error: data\.root '.*one_class' needs at least two class sub-folders"),
    "teacher ONNX truncated": (
        ["train", "{fast}", "teacher.checkpoint={dir}/truncated.onnx"], 2,
        r"error: teacher ONNX '.*truncated\.onnx' cannot be loaded: .*INVALID_PROTOBUF.*"),
    "batch size 0": (
        ["train", "{fast}", "data.batch_size=0"], 2,
        r"error: 'data\.batch_size' must be > 0; got 0"),
    "multi-process launch without output_dir": (
        ["train", "{fast_no_out}"], 2,
        r"error: a multi-process launch \(torchrun, srun\) needs output_dir=\.\.\. so that "
        r"every rank writes to the same run directory"),
    "resume: checkpoint damaged": (
        ["train", "--resume", "{run}"], 2,
        r"error: --resume: checkpoint '.*damaged_run/checkpoints/last\.ckpt' is damaged "
        r"\(truncated or not a torch checkpoint: .*\)"),
    "resume: no checkpoint": (
        ["train", "--resume", "{no_ckpt}"], 2,
        r"error: --resume: no checkpoint to resume at '.*run_without_checkpoint/checkpoints/"
        r"last\.ckpt'"),
    "resume: not a run directory": (
        ["train", "--resume", "{dir}/one_class"], 2,
        r"error: --resume: '.*one_class' is not a run directory \(no recipe\.yaml\)"),
    "resume with a recipe": (
        ["train", "digits_kd", "--resume", "{run}"], 2,
        r"error: --resume takes the run's own recipe; give overrides only"),
    "bench: truncated ONNX": (
        ["bench", "{dir}/truncated.onnx", "--iters", "2"], 2,
        r"error: .*truncated\.onnx: not a loadable ONNX model: .*INVALID_PROTOBUF.*"),
    "export: truncated checkpoint": (
        ["export", "{run}/checkpoints/last.ckpt", "--out", "{dir}/never.onnx"], 2,
        r"error: checkpoint '.*last\.ckpt' cannot be read \(corrupted or not a torch file\).*"),
    "export: not a distill checkpoint": (
        ["export", "{dir}/teacher.pt", "--out", "{dir}/never.onnx"], 2,
        r"error: checkpoint '.*teacher\.pt' was not written by `distill train` \(no recipe\)"),
    "gate: report is not JSON": (
        ["gate", "{dir}/report.json", "--accuracy", "0.9"], 2,
        r"error: report '.*report\.json' is not JSON: Expecting property name .*"),
}


def _expand(argv: list[str], files: dict[str, Path], out: Path) -> list[str]:
    args: list[str] = []
    for item in argv:
        if item == "{fast}":
            args += _fast(files, out)
        elif item == "{fast_no_out}":
            args += _fast(files, out)[:-1]
        else:
            args.append(item.format(dir=files["dir"], run=files["run"], no_ckpt=files["no_ckpt"]))
    return args


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, files, tmp_path, monkeypatch, capsys):
    argv, code, line = CASES[case]
    out = tmp_path / "run"
    if case.startswith("multi-process"):  # what torchrun sets for the second process
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(files["dir"])
    assert main(_expand(argv, files, out)) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(line, err), err
    # Nothing lost, nothing half-made: no run directory, every input as it was.
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert _snapshot(files["dir"]) == before


def test_bad_input_override_yaml_syntax(files, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *_fast(files, out), "student.kwargs={widths:[4,8]}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: cannot parse override 'student.kwargs={widths:[4,8]}'")
    assert not out.exists()

