"""Shared fixtures: W&B offline into tmp, quiet libraries, small digits data."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path, monkeypatch):
    """W&B stays offline and writes only under the test's tmp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        d = tmp_path / "_wandb" / var.lower()
        d.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(d))
    yield


@pytest.fixture(scope="session")
def digits():
    from distill.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, image_size=16, seed=0)
    dm.prepare()
    return dm


def tiny_student(widths=(4, 8), num_classes=10):
    from distill.models import ResNetCNN

    return ResNetCNN(1, num_classes, widths=widths, blocks=1)


os.environ.setdefault("PYTHONHASHSEED", "0")
