"""``distill train --resume RUN_DIR`` after a ``kill -9`` in the middle of writing an artifact.

The killed run goes through a small driver (``KILLER``) that lets the real exporter write the
epoch-2 ONNX to its temporary name, cuts that file in half and sends itself ``SIGKILL``: a
hard kill at a known point, mid-write. Then:

- the run directory is consistent: no ``epoch_002.onnx``, no report, no ``student.onnx``;
  every ONNX file under its final name is complete; ``last.ckpt`` is the epoch-1 one;
- ``--resume`` finishes the run: the report lists every epoch once, and equals an
  uninterrupted run with the same seed (architecture, epochs, delivered epoch, accuracies);
- the W&B run is continued: both processes log under the run id kept in the run directory.

The digits loader's order depends only on (seed, epoch), so the resumed epochs see the same
batches as the uninterrupted run and match it exactly.
The pruning at epoch 1 makes the checkpoint hold a pruned student: the resume must rebuild
that architecture before loading the weights, then continue the pruning schedule.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from distill.cli import main

KILLER = r'''
import os, signal, sys
from pathlib import Path

import torch

_export = torch.onnx.export


def export_then_die(model, args, f, *rest, **kwargs):
    out = _export(model, args, f, *rest, **kwargs)
    if Path(str(f)).name.startswith(".epoch_002.onnx."):  # atomic_path's temporary name
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return out


torch.onnx.export = export_then_die

from distill.cli import main

sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory):
    """A teacher trained for a few full-batch steps (plain torch: a second or two)."""
    from distill.data import DigitsDataModule
    from distill.models import build_model

    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=256, image_size=8, seed=0)
    x, y = dm.dataset("train").tensors
    model = build_model("resnet", 1, 10, widths=(8, 16), blocks=1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


def run_args(teacher: Path, out: Path) -> list[str]:
    return [
        "train", "name=resume", "data.image_size=8", "trainer.max_epochs=4",
        "trainer.enable_progress_bar=false",
        "teacher.name=resnet", "teacher.kwargs={widths: [8, 16], blocks: 1}",
        f"teacher.checkpoint={teacher}",
        "student.name=resnet", "student.kwargs={widths: [8, 16], blocks: 1}",
        # channels pruned 25% at epoch 1 (in the checkpoint), 37.5% at 2, 50% at 3
        "prune.method=structured", "prune.schedule=linear", "prune.start_epoch=1",
        "prune.end_epoch=3", "prune.initial_sparsity=0.25", "prune.target_sparsity=0.5",
        # ONNX of widths (5, 10) is 0.0111 MB, (4, 8) 0.0084 MB (export.exporter=auto, BN
        # folded): met at epoch 3, not before
        "targets.size_mb=0.0095", "targets.p99_ms=null", "targets.max_accuracy_drop=null",
        "export.iters=5", "export.warmup=1", "logger.wandb=true", "logger.mode=offline",
        f"output_dir={out}",
    ]


def wandb_run_ids(run_dir: Path) -> list[str]:
    """The run ids of the offline W&B runs in a run directory (``offline-run-<time>-<id>``)."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def final_onnx(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.onnx") if not p.name.startswith("."))


def test_kill_9_mid_export_then_resume_equals_an_uninterrupted_run(tmp_path, teacher_pt):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("DISTILL_RUN_DIR", None)
    # W&B keeps its service address in WANDB_SERVICE once this process has started one (an
    # earlier test): a child inheriting it registers its run in *our* service, and after the
    # kill -9 that run id stays "in use" there, so the resume below would be refused.
    env.pop("WANDB_SERVICE", None)
    # The run to kill goes in the background while the reference runs here (2 cores).
    proc = subprocess.Popen([sys.executable, str(script), *run_args(teacher_pt, killed)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert main(run_args(teacher_pt, ref)) == 0
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == -9, err[-2000:]

    # Consistent after the kill: complete files under final names, the half-written one hidden.
    assert final_onnx(killed / "epochs") == ["epoch_000.onnx", "epoch_001.onnx"]
    for name in final_onnx(killed / "epochs"):
        onnx.checker.check_model(str(killed / "epochs" / name), full_check=True)
    onnx.checker.check_model(str(killed / "teacher.onnx"), full_check=True)
    hidden = [p for p in (killed / "epochs").iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].name.startswith(".epoch_002.onnx.")
    with pytest.raises(onnx.checker.ValidationError, match="Unable to parse proto"):
        onnx.checker.check_model(str(hidden[0]), full_check=True)  # the half file: garbage
    for name in ("report.json", "report.md", "student.onnx"):
        assert not (killed / name).exists(), name
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["epoch"] == 1

    assert main(["train", "--resume", str(killed)]) == 0
    got = json.loads((killed / "report.json").read_text())
    want = json.loads((ref / "report.json").read_text())

    # Every epoch once, in order, as in the uninterrupted run.
    assert [e["epoch"] for e in got["epochs"]] == [e["epoch"] for e in want["epochs"]] == [
        0, 1, 2, 3]
    # The resume removed the interrupted write's temporary; every epoch's file is complete.
    assert sorted(p.name for p in (killed / "epochs").iterdir()) == [
        f"epoch_{i:03d}.onnx" for i in range(4)]
    # Same architecture per epoch (pruned at epoch 1) and delivered.
    for key in ("params", "macs"):
        assert [e[key] for e in got["epochs"]] == [e[key] for e in want["epochs"]], key
        assert got["student"][key] == want["student"][key], key
    params = [e["params"] for e in got["epochs"]]
    assert params == sorted(params, reverse=True) and len(set(params)) == 4
    assert got["epochs_trained"] == want["epochs_trained"] == 4
    assert got["targets"]["met_at_epoch"] == want["targets"]["met_at_epoch"] == 3
    # Epochs before the kill come from the checkpoint: exactly the uninterrupted numbers.
    for g, w in zip(got["epochs"][:2], want["epochs"][:2]):
        assert g["val_accuracy"] == w["val_accuracy"]
        assert g["val_accuracy_onnx"] == w["val_accuracy_onnx"]
    # After the resume: the same batches (epoch-seeded sampler) and the same optimizer state.
    for g, w in zip(got["epochs"][2:], want["epochs"][2:]):
        assert abs(g["val_accuracy_onnx"] - w["val_accuracy_onnx"]) == 0, (g, w)
    assert got["delivered"]["epoch"] == want["delivered"]["epoch"] == 3
    assert abs(got["student"]["accuracy"] - want["student"]["accuracy"]) == 0
    onnx.checker.check_model(str(killed / "student.onnx"), full_check=True)

    # W&B: the resumed process logged to the same run id, stored in the run directory.
    run_id = (killed / "wandb_run_id").read_text().strip()
    assert wandb_run_ids(killed) == [run_id, run_id]
    assert wandb_run_ids(ref) == [(ref / "wandb_run_id").read_text().strip()] != [run_id]
    # The killed process's CSV metrics are kept beside the resumed run's (Lightning's CSV
    # logger would delete them).
    assert {"0", "1"} <= validated_epochs(killed / "metrics.before-resume-1.csv")
    assert validated_epochs(killed / "metrics.csv") == {"2", "3"}


def validated_epochs(csv_path: Path) -> set[str]:
    with open(csv_path, newline="") as f:
        return {row["epoch"] for row in csv.DictReader(f) if row.get("val/accuracy")}

