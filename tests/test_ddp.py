"""DDP on CPU (gloo): ``distill train trainer.devices=2 trainer.strategy=ddp`` end to end.

Lightning's DDP launcher starts rank 1 by re-running the command line, so rank 1 re-runs the
whole run builder. The run goes through a small driver script (``PROBE``) that adds an observer
callback and logs every artifact write (``distill.io.atomic_path``) per rank, then calls the
real CLI. What it checks, on real processes:

- one run directory (the timestamped name is resolved once, on rank 0), and rank 1 writes no
  artifact into it;
- both ranks distill from the same teacher (trained once, by rank 0), which DDP does not wrap;
- a structured prune with ``taylor`` importance (gradients differ per rank) leaves identical
  parameters on both ranks: rank 0 decides, the plan is broadcast;
- the size target is met right after the prune, and both ranks stop at that epoch; the report
  lists exactly the epochs up to the stop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r'''
import contextlib, hashlib, json, os, sys
from pathlib import Path

OUT = Path(os.environ["DISTILL_PROBE_DIR"])


def rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


import distill.io as io  # patched before anything imports atomic_path by name

_atomic_path = io.atomic_path


@contextlib.contextmanager
def logged_atomic_path(path, *args, **kwargs):
    with open(OUT / f"writes-{rank()}.txt", "a") as f:
        f.write(str(Path(path).resolve()) + "\n")
    with _atomic_path(path, *args, **kwargs) as tmp:
        yield tmp


io.atomic_path = logged_atomic_path

import pytorch_lightning as pl
import torch

import distill.run as run


def checksum(module):
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Probe(pl.Callback):
    def __init__(self):
        self.info = {"epochs": {}}

    def on_fit_start(self, trainer, pl_module):
        teacher = {id(p) for p in pl_module.teacher.parameters()}
        wrapped = trainer.strategy.model
        self.info.update(
            rank=trainer.global_rank, world_size=trainer.world_size,
            wrapper=type(wrapped).__name__,
            teacher_params_in_ddp=sum(id(p) in teacher for p in wrapped.parameters()),
            teacher_keys_in_state=[k for k in pl_module.state_dict() if "teacher" in k],
            teacher_checksum=checksum(pl_module.teacher),
            run_dir=str(Path(trainer.default_root_dir).resolve()),
        )

    def on_train_epoch_start(self, trainer, pl_module):  # runs after the pruning callback's
        self.info["epochs"][trainer.current_epoch] = {
            "after_prune": checksum(pl_module.student),
            "widths": [m.out_channels for m in pl_module.student.modules()
                       if isinstance(m, torch.nn.Conv2d)],
            "student_type": type(pl_module.student).__name__,
        }

    def on_train_epoch_end(self, trainer, pl_module):
        self.info["epochs"][trainer.current_epoch]["end"] = checksum(pl_module.student)

    def on_fit_end(self, trainer, pl_module):
        self.info["stopped_at"] = trainer.current_epoch
        self.info["should_stop"] = bool(trainer.should_stop)
        (OUT / f"rank-{trainer.global_rank}.json").write_text(json.dumps(self.info))


_build = run.build_callbacks
run.build_callbacks = lambda *a, **k: _build(*a, **k) + [Probe()]

from distill.cli import main

sys.exit(main(sys.argv[1:]))
'''


def _run_ddp(tmp_path, args):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    script = tmp_path / "ddp_probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "DISTILL_PROBE_DIR": str(probe_dir), "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1"}
    env.pop("DISTILL_RUN_DIR", None)
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((tmp_path / "runs" / "ddp").iterdir())
    assert len(run_dirs) == 1, run_dirs  # one run directory, timestamped by rank 0
    ranks = [json.loads((probe_dir / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return proc, run_dirs[0].resolve(), ranks, probe_dir


COMMON = [
    "train", "name=ddp", "data.image_size=8", "data.batch_size=32",
    "teacher.name=resnet", "teacher.kwargs={widths: [16, 32], blocks: 1}",
    "teacher.train_epochs=1",
    "student.name=resnet", "student.kwargs={widths: [16, 32], blocks: 1}",
    "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
    "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false", "logger.wandb=false",
    "export.iters=5", "export.warmup=1",
]


def test_ddp_two_cpu_ranks_share_one_run_dir_and_stop_together(tmp_path):
    args = [
        *COMMON, f"teacher.cache_dir={tmp_path / 'teachers'}", "trainer.max_epochs=3",
        # one prune at the start of epoch 1; taylor scores differ per rank (own gradients)
        "prune.method=structured", "prune.schedule=constant", "prune.start_epoch=1",
        "prune.end_epoch=1", "prune.target_sparsity=0.5", "prune.importance=taylor",
        # unpruned student ~0.10 MB, pruned ~0.05 MB: met at epoch 1, the stop comes early
        "targets.size_mb=0.075", "targets.p99_ms=null", "targets.max_accuracy_drop=null",
    ]
    proc, run_dir, ranks, probe_dir = _run_ddp(tmp_path, args)

    # One run directory, timestamped by rank 0, used by both ranks.
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[1]["world_size"] == 2
    assert {r["run_dir"] for r in ranks} == {str(run_dir)}

    # Only rank 0 writes artifacts into the run directory (rank 1 only reads the cache).
    writes0 = (probe_dir / "writes-0.txt").read_text().split()
    writes1 = (probe_dir / "writes-1.txt").read_text().split() if (
        probe_dir / "writes-1.txt").exists() else []
    assert str(run_dir / "report.json") in writes0 and str(run_dir / "recipe.yaml") in writes0
    assert [w for w in writes1 if w.startswith(str(run_dir))] == []
    # The teacher was trained and cached once, by rank 0 (rank 1 started after, loaded it).
    assert [w for w in writes0 if "teachers" in w] and not [w for w in writes1 if "teachers" in w]

    # Same teacher on both ranks, kept out of DDP and out of the checkpoint.
    for r in ranks:
        assert r["wrapper"] == "DistributedDataParallel"
        assert r["teacher_params_in_ddp"] == 0 and r["teacher_keys_in_state"] == []
    assert ranks[0]["teacher_checksum"] == ranks[1]["teacher_checksum"]

    # The prune at epoch 1: same channels on both ranks, and the ranks stay in sync after it.
    e0, e1 = ranks[0]["epochs"], ranks[1]["epochs"]
    assert e0["1"]["widths"] == e1["1"]["widths"]
    assert sum(e0["1"]["widths"]) < sum(e0["0"]["widths"])
    for epoch in e0:
        assert e0[epoch]["after_prune"] == e1[epoch]["after_prune"], epoch
        assert e0[epoch]["end"] == e1[epoch]["end"], epoch

    # Both ranks stop at the epoch that met the target, before max_epochs (3).
    assert sorted(e0) == sorted(e1) == ["0", "1"]
    assert [r["stopped_at"] for r in ranks] == [2, 2]  # the epoch counter after epoch 1
    assert all(r["should_stop"] for r in ranks)
    report = json.loads((run_dir / "report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [0, 1]
    assert report["targets"]["met"] and report["targets"]["met_at_epoch"] == 1
    assert report["delivered"]["epoch"] == 1 and report["student"]["size_mb"] <= 0.075
    assert sorted(p.name for p in (run_dir / "epochs").iterdir()) == [
        "epoch_000.onnx", "epoch_001.onnx"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "targets met at epoch 1" in proc.stdout


def test_ddp_quantization_aware_training_stays_in_sync_and_delivers_int8(tmp_path):
    from distill.export.quantize import fused_op_report

    args = [
        *COMMON, f"teacher.cache_dir={tmp_path / 'teachers'}", "trainer.max_epochs=3",
        # QAT from epoch 1 (PT2E prepare on every rank), BN and observers frozen at epoch 2
        "qat.mode=qat", "qat.start_epoch=1", "qat.calib_batches=2", "qat.freeze_bn_epoch=2",
        "qat.freeze_observer_epoch=2",
        "targets.size_mb=null", "targets.p99_ms=null", "targets.max_accuracy_drop=null",
    ]
    proc, run_dir, ranks, probe_dir = _run_ddp(tmp_path, args)
    e0, e1 = ranks[0]["epochs"], ranks[1]["epochs"]
    assert sorted(e0) == sorted(e1) == ["0", "1", "2"]
    # the prepared (fake-quant) student replaces the float one on both ranks at epoch 1 ...
    assert e0["0"]["student_type"] == e1["0"]["student_type"] == "ResNetCNN"
    assert e0["1"]["student_type"] == e1["1"]["student_type"] == "GraphModule"
    # ... and DDP keeps the ranks identical through the QAT epochs
    for epoch in e0:
        assert e0[epoch]["end"] == e1[epoch]["end"], epoch
    assert e0["2"]["end"] != e0["1"]["end"]  # it still trains
    report = json.loads((run_dir / "report.json").read_text())
    assert [e["quantized"] for e in report["epochs"]] == [False, True, True]
    # (which epoch is delivered depends on this near-random tiny model's INT8 parity, so the
    # check is on the last epoch's export)
    fused = fused_op_report(run_dir / "epochs" / "epoch_002.onnx")
    assert fused["float_compute"] == [] and fused["int8_compute"] >= 5
    assert (run_dir / "student_fp32.onnx").is_file()
    writes1 = (probe_dir / "writes-1.txt").read_text().split() if (
        probe_dir / "writes-1.txt").exists() else []
    assert [w for w in writes1 if w.startswith(str(run_dir))] == []
