"""The CLI's contract on bad input: one clear line, exit code 2, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.models import build_model


@pytest.fixture
def teacher_ckpt(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(build_model("resnet", 1, 10, widths=(8, 16), blocks=1).state_dict(), path)
    return path


def _fast(tmp_path, teacher_ckpt):
    return [
        "data.image_size=8", "trainer.max_epochs=1", "export.enabled=false",
        "logger.wandb=false", f"teacher.checkpoint={teacher_ckpt}", "teacher.name=resnet",
        "teacher.kwargs={widths: [8, 16], blocks: 1}", f"output_dir={tmp_path / 'run'}",
    ]


CASES = {
    "missing recipe": (["nope.yaml"], r"recipe file not found: 'nope.yaml'"),
    "unknown key": (["trainer.max_epoch=3"], r"unknown key 'trainer.max_epoch'"),
    "wrong type": (["seed=abc"], r"bad value for 'seed'"),
    "target not importable": (["student._target_=nopkg.Net"],
                              r"student._target_ 'nopkg.Net' does not import"),
    "target not a model": (["student._target_=collections.OrderedDict"],
                           r"student._target_ 'collections.OrderedDict' is not a "
                           r"torch.nn.modules.module.Module subclass"),
    "target is a function": (["student._target_=os.system"],
                             r"student._target_ 'os.system' is not a torch.nn"),
    "data target not a datamodule": (["data._target_=distill.models.ResNetCNN"],
                                     r"data._target_ 'distill.models.ResNetCNN' is not a "
                                     r"pytorch_lightning"),
    "unknown model name": (["student.name=resnet_studnt"],
                           r"unknown model 'resnet_studnt' \(did you mean 'resnet_student'\?\)"),
    "teacher missing": (["teacher.checkpoint=/nonexistent/t.pt"],
                        r"teacher.checkpoint not found: '/nonexistent/t.pt'"),
    "unknown feature layer": (["distill.feature.weight=1",
                               "distill.feature.pairs=[{student: stages.7, teacher: stages.0}]"],
                              r"student has no layer named 'stages.7'"),
    "p99 negative": (["targets.p99_ms=-1"], r"'targets.p99_ms' must be > 0"),
    "accuracy above 1": (["targets.accuracy=1.2"], r"'targets.accuracy' must be in \[0, 1\]"),
    "devices zero": (["trainer.devices=0"], r"'trainer.devices' must be >= 1"),
    "name escapes": (["name=../../x"], r"'name' must be a plain name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_no_run_dir(case, tmp_path, teacher_ckpt, capsys):
    args, match = CASES[case]
    recipe = [] if "=" in args[0] else [args.pop(0)] if args else []
    code = main(["train", *recipe, *_fast(tmp_path, teacher_ckpt), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert pytest.importorskip("re").search(match, err), err
    assert not (tmp_path / "run").exists()


def test_teacher_checkpoint_not_matching_architecture(tmp_path, teacher_ckpt, capsys):
    args = _fast(tmp_path, teacher_ckpt) + ["teacher.kwargs={widths: [8, 32], blocks: 1}"]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match the architecture" in err and "teacher.checkpoint" in err
    assert not (tmp_path / "run").exists()


def test_corrupted_teacher_checkpoint(tmp_path, teacher_ckpt, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["train", *_fast(tmp_path, teacher_ckpt), f"teacher.checkpoint={bad}"]) == 2
    assert "cannot be read (corrupted or not a torch file)" in capsys.readouterr().err


def test_output_dir_is_a_file_or_not_writable(tmp_path, teacher_ckpt, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", *_fast(tmp_path, teacher_ckpt), f"output_dir={f}"]) == 2
    assert f"output_dir '{f}' exists and is a file" in capsys.readouterr().err
    assert main(["train", *_fast(tmp_path, teacher_ckpt), "output_dir=/proc/distill/run"]) == 2
    assert "output_dir '/proc/distill/run' is not writable" in capsys.readouterr().err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("distill")
    out = subprocess.run([str(exe), "train", "trainer.max_epoch=3"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: unknown key 'trainer.max_epoch' in overrides"


def test_help_version_and_recipes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "distill 0.1.0" in capsys.readouterr().out
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    assert "digits_kd" in names and "bundled digits" in out and names == sorted(names)
