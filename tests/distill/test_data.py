from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from distill.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from distill.errors import UserError


def test_digits_split_is_fixed_by_seed_and_disjoint():
    a, b = DigitsDataModule(image_size=8), DigitsDataModule(image_size=8)
    assert a.split_sizes() == b.split_sizes() == {"train": 1079, "val": 359, "test": 359}
    xa = a.dataset("val").tensors[0]
    assert torch.equal(xa, b.dataset("val").tensors[0])
    c = DigitsDataModule(image_size=8, split_seed=1)
    assert not torch.equal(xa, c.dataset("val").tensors[0])
    train = {tuple(r.flatten().tolist()) for r in a.dataset("train").tensors[0][:200]}
    test = {tuple(r.flatten().tolist()) for r in a.dataset("test").tensors[0]}
    assert len(train & test) <= 2  # digits has a few duplicate images, nothing more


def test_digits_normalisation_recorded_and_applied():
    dm = DigitsDataModule(image_size=32)
    x = dm.dataset("train").tensors[0]
    assert x.shape[1:] == (1, 32, 32) == dm.input_shape
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    assert set(dm.preprocessing) >= {"scale", "resize", "normalize", "mean", "std"}


def test_train_fraction_reduces_train_only():
    dm = DigitsDataModule(image_size=8, train_fraction=0.1)
    sizes = dm.split_sizes()
    assert sizes["train"] == 108 and sizes["val"] == 359


def _write_cifar(root, n=20):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "test_batch"]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reads_python_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=8, val_fraction=0.2)
    sizes = dm.split_sizes()
    assert sizes == {"train": 30, "val": 10, "test": 20}  # stratified: 1 of 4 per class
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.long


def test_cifar10_missing_root_and_bad_file(tmp_path):
    with pytest.raises(UserError, match=r"data.root does not exist: '/nonexistent'"):
        CIFAR10DataModule(root="/nonexistent")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"not a CIFAR-10 python batch"):
        CIFAR10DataModule(root=str(tmp_path / "c")).prepare()


def test_image_folder(tmp_path):
    from PIL import Image

    tmp_path = tmp_path / "images"
    tmp_path.mkdir()
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            img = Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8))
            img.save(tmp_path / cls / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, val_fraction=0.2,
                               test_fraction=0.2)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert sum(dm.split_sizes().values()) == 10
    assert dm.dataset("train").tensors[0].shape[1:] == (3, 16, 16)
