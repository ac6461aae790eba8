"""`distill train` end to end on tiny settings: run directory, report, W&B files, target stop."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from distill.cli import main
from distill.models import build_model

TINY = [
    "data.image_size=8", "teacher.name=resnet", "teacher.kwargs={widths: [8, 16], blocks: 1}",
    "student.name=resnet", "student.kwargs={widths: [4, 8], blocks: 1}",
    "export.iters=20", "export.warmup=2", "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A teacher trained for two epochs once for this module (via the library, not mocked)."""
    from distill.config import load_recipe
    from distill.instantiate import build_datamodule
    from distill.teacher import load_or_train_teacher

    cache = tmp_path_factory.mktemp("teachers")
    cfg = load_recipe(None, TINY + ["teacher.train_epochs=2", f"teacher.cache_dir={cache}"])
    from omegaconf import OmegaConf

    recipe = OmegaConf.to_container(cfg, resolve=True)
    dm = build_datamodule(recipe["data"], 0)
    teacher, info = load_or_train_teacher(recipe, dm, 1, 10)
    assert info["source"] == "trained" and Path(info["path"]).is_file()
    again, info2 = load_or_train_teacher(recipe, dm, 1, 10)
    assert info2["source"] == "cache"  # the next run of the same recipe reuses it
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                 again.state_dict().values()))
    return info["path"]


def _train(tmp_path, teacher_ckpt, *extra):
    out = tmp_path / "run"
    code = main(["train", *TINY, f"teacher.checkpoint={teacher_ckpt}", f"output_dir={out}",
                 *extra])
    return code, out


def test_reachable_targets_stop_early_and_deliver_that_epoch(tmp_path, teacher_ckpt, capsys):
    code, run = _train(tmp_path, teacher_ckpt, "trainer.max_epochs=6", "targets.accuracy=0.3",
                       "targets.p99_ms=1000", "targets.max_accuracy_drop=null")
    assert code == 0
    stdout = capsys.readouterr().out
    assert "teacher  accuracy" in stdout and "student  accuracy" in stdout and str(run) in stdout
    for name in ("student.onnx", "teacher.onnx", "report.json", "report.md", "pareto.png",
                 "recipe.yaml", "metrics.csv", "checkpoints/last.ckpt", "MODEL_CARD.md"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    met = report["targets"]["met_at_epoch"]
    assert report["targets"]["met"] and met is not None
    assert len(report["epochs"]) == met + 1 < 6  # stopped before max_epochs
    assert report["delivered"]["epoch"] == met
    for side in ("teacher", "student"):
        s = report[side]
        assert 0 <= s["accuracy"] <= 1 and s["size_mb"] > 0
        assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["input"]["shape"] == ["batch", 1, 8, 8]
    assert set(report["environment"]) >= {"onnxruntime", "torch", "threads", "cpu", "provider"}
    if platform.libc_ver()[0] == "glibc":  # distill train tuned the allocator (distill.perf)
        assert report["environment"]["malloc"] == "tuned"
    delivered = (run / "student.onnx").read_bytes()
    assert delivered == (run / report["epochs"][met]["onnx"]).read_bytes()
    sess = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: np.zeros((3, 1, 8, 8), np.float32)})[0]
    assert logits.shape == (3, 10)
    # W&B offline run files hold the recipe and the final numbers
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    blob = next(wandb_run.glob("*.wandb")).read_bytes()
    assert b"student/accuracy" in blob and b"speedup_p99" in blob  # the summary
    assert b"temperature" in blob and b"max_epochs" in blob  # the recipe as the run's config
    assert list((wandb_run / "files" / "media" / "table").glob("epochs_*.table.json"))
    assert b"digits_kd-student" in blob  # the delivered ONNX logged as a model artifact


def test_unreachable_p99_runs_to_the_end_and_says_so(tmp_path, teacher_ckpt):
    code, run = _train(tmp_path, teacher_ckpt, "trainer.max_epochs=2", "targets.p99_ms=0.000001",
                       "logger.wandb=false", "serving.enabled=true", "serving.qps=100",
                       "serving.duration_s=0.5", "serving.max_batch=4")
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    assert not report["targets"]["met"] and report["targets"]["met_at_epoch"] is None
    assert [r["epoch"] for r in report["epochs"]] == [0, 1]
    assert "not met" in (run / "report.md").read_text()
    assert report["delivered"]["epoch"] in (0, 1) and report["delivered"]["reason"]
    # the optional serving section: the delivered student under Poisson load, three strategies
    strategies = report["serving"]["strategies"]
    assert set(strategies) == {"none", "static", "dynamic"}
    assert all(s["completed"] > 0 and s["p50_ms"] <= s["p99_ms"] for s in strategies.values())
    assert max(int(k) for k in strategies["dynamic"]["batch_hist"]) <= 4
    assert "## Serving check" in (run / "report.md").read_text()


def test_export_of_checkpoint(tmp_path, teacher_ckpt, capsys):
    code, run = _train(tmp_path, teacher_ckpt, "trainer.max_epochs=1", "logger.wandb=false",
                       "export.enabled=false")
    assert code == 0
    out = tmp_path / "exported.onnx"
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    student = build_model("resnet", 1, 10, widths=[4, 8], blocks=1)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
    expected = student.eval()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], expected, atol=1e-4)


def test_export_of_a_qat_checkpoint_gives_the_int8_model(tmp_path, teacher_ckpt):
    code, run = _train(tmp_path, teacher_ckpt, "trainer.max_epochs=2", "logger.wandb=false",
                       "qat.mode=qat", "qat.start_epoch=1", "qat.calib_batches=2",
                       "qat.float_fan_in_below=0", "targets.p99_ms=null",
                       "targets.max_accuracy_drop=null")
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    assert report["epochs"][-1]["quantized"] and not report["epochs"][0]["quantized"]
    assert (run / "student_fp32.onnx").is_file()
    out = tmp_path / "from_ckpt.onnx"
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    from distill.export.onnx import count_quant_nodes

    assert count_quant_nodes(out) > 0  # INT8 Q/DQ, not a float graph
    x = np.random.default_rng(1).normal(size=(16, 1, 8, 8)).astype(np.float32)
    preds = []
    for path in (out, run / report["epochs"][-1]["onnx"]):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        preds.append(sess.run(None, {"input": x})[0].argmax(1))
    assert (preds[0] == preds[1]).mean() >= 0.9  # the same model as the run's last INT8 epoch
