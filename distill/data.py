"""Data modules: bundled digits (default), local CIFAR-10 pickles, an image folder.

Nothing is ever downloaded: digits ship with scikit-learn, CIFAR-10 and image folders are read
from a local path.

Every data module exposes ``input_shape`` (C, H, W), ``num_classes``, ``class_names`` and
``preprocessing`` (a dict a server needs to feed the model: scaling, mean, std, resize).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from distill.errors import UserError


class EpochSeededSampler(Sampler[int]):
    """A random order that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` every epoch, so a run resumed at epoch ``e`` sees the same
    batches as an uninterrupted one (a generator seeded once per fit would not).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _split_indices(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stratified train/val/test split that depends only on ``seed``."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        test.extend(idx[:n_test])
        val.extend(idx[n_test : n_test + n_val])
        train.extend(idx[n_test + n_val :])
    return np.sort(train), np.sort(val), np.sort(test)


class _TensorDataModule(pl.LightningDataModule):
    """Shared plumbing: tensors in memory, standardised with train-split statistics."""

    num_classes: int
    class_names: list[str]
    name = "tensors"

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        train_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1; got {batch_size}")
        if not 0.0 < train_fraction <= 1.0:
            raise UserError(f"data.train_fraction must be in (0, 1]; got {train_fraction}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_fraction = train_fraction
        self.seed = seed
        self._splits: dict[str, TensorDataset] | None = None
        self.preprocessing: dict[str, Any] = {}

    # Subclasses return float images (N, C, H, W) in [0, 1] and int labels, plus split indices.
    def _load(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Load and split once (idempotent); called by ``setup`` and by the run builder."""
        if self._splits is not None:
            return
        x, y, idx = self._load()
        train_idx = idx["train"]
        if self.train_fraction < 1.0:
            rng = np.random.default_rng(self.seed + 1)
            keep = max(self.num_classes, int(round(len(train_idx) * self.train_fraction)))
            train_idx = np.sort(rng.choice(train_idx, size=keep, replace=False))
        mean = x[train_idx].mean(dim=(0, 2, 3))
        std = x[train_idx].std(dim=(0, 2, 3)).clamp_min(1e-6)
        x = (x - mean[None, :, None, None]) / std[None, :, None, None]
        self.preprocessing.update(
            {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}
        )
        self._splits = {
            "train": TensorDataset(x[train_idx], y[train_idx]),
            "val": TensorDataset(x[idx["val"]], y[idx["val"]]),
            "test": TensorDataset(x[idx["test"]], y[idx["test"]]),
        }

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def dataset(self, split: str) -> Dataset:
        self.prepare()
        assert self._splits is not None
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.dataset(split)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(data), self.seed) if shuffle else None,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def split_sizes(self) -> dict[str, int]:
        self.prepare()
        assert self._splits is not None
        return {k: len(v) for k, v in self._splits.items()}


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes).

    Split: stratified by class with ``split_seed`` (default 20% test, 20% validation, the
    rest train). Preprocessing, recorded in ``preprocessing``: pixel values 0..16 scaled to
    [0, 1], bilinear resize to ``image_size`` (8 keeps the originals; 32 makes the
    convolutions do real work), then per-channel standardisation with train-split statistics.

    Example:
        >>> dm = DigitsDataModule(batch_size=32, image_size=32)
        >>> dm.input_shape
        (1, 32, 32)
    """

    name = "digits"
    num_classes = 10
    class_names = [str(i) for i in range(10)]

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 32,
        train_fraction: float = 1.0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, train_fraction, seed)
        if image_size < 8:
            raise UserError(f"data.image_size must be >= 8 for digits; got {image_size}")
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.input_shape = (1, image_size, image_size)
        self.preprocessing = {
            "source": "sklearn.datasets.load_digits",
            "scale": "pixel / 16",
            "resize": f"bilinear 8x8 -> {image_size}x{image_size} (align_corners=False)",
            "normalize": "(x - mean) / std, per channel, train-split statistics",
            "layout": "NCHW float32",
        }

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        y = torch.tensor(digits.target, dtype=torch.long)
        tr, va, te = _split_indices(
            digits.target, self.val_fraction, self.test_fraction, self.split_seed
        )
        return x, y, {"train": tr, "val": va, "test": te}


class CIFAR10DataModule(_TensorDataModule):
    """CIFAR-10 from the standard python-pickle batches in a local folder (never downloaded).

    ``root`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (the
    ``cifar-10-batches-py`` folder, or its parent). Validation is a stratified
    ``val_fraction`` of the training batches; the test split is ``test_batch``.
    """

    name = "cifar10"
    num_classes = 10
    class_names = [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ]

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 0,
        train_fraction: float = 1.0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, train_fraction, seed)
        if not root:
            raise UserError("data.root is required for cifar10 (a local cifar-10-batches-py)")
        path = Path(root).expanduser()
        if (path / "cifar-10-batches-py").is_dir():
            path = path / "cifar-10-batches-py"
        if not path.is_dir():
            raise UserError(f"data.root does not exist: '{root}'")
        self.root = path
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.input_shape = (3, 32, 32)
        self.preprocessing = {
            "source": "CIFAR-10 python batches",
            "scale": "pixel / 255",
            "normalize": "(x - mean) / std, per channel, train-split statistics",
            "layout": "NCHW float32, RGB",
        }

    def _read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        file = self.root / name
        if not file.is_file():
            raise UserError(f"CIFAR-10 batch file missing: '{file}'")
        with open(file, "rb") as f:
            try:
                batch = pickle.load(f, encoding="latin1")  # the format's own encoding
            except Exception:
                raise UserError(f"not a CIFAR-10 python batch: '{file}'") from None
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return data, np.asarray(batch["labels"], dtype=np.int64)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
        names = [p.name for p in sorted(self.root.glob("data_batch_*"))]
        if not names:
            raise UserError(f"no data_batch_* files in data.root '{self.root}'")
        parts = [self._read(n) for n in names]
        tx = np.concatenate([p[0] for p in parts])
        ty = np.concatenate([p[1] for p in parts])
        ex, ey = self._read("test_batch")
        x = torch.from_numpy(np.concatenate([tx, ex])).float() / 255.0
        y = torch.from_numpy(np.concatenate([ty, ey]))
        tr, va, _ = _split_indices(ty, self.val_fraction, 0.0, self.split_seed)
        te = np.arange(len(tx), len(tx) + len(ex))
        return x, y, {"train": tr, "val": va, "test": te}


class ImageFolderDataModule(_TensorDataModule):
    """Images in ``root/<class_name>/*.png|jpg`` read with PIL, resized to ``image_size``.

    Classes are the sorted sub-folder names. The split is stratified by ``split_seed``.
    Meant for small data sets that fit in memory.
    """

    name = "image_folder"
    EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 0,
        image_size: int = 32,
        channels: int = 3,
        train_fraction: float = 1.0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, train_fraction, seed)
        if not root or not Path(root).expanduser().is_dir():
            raise UserError(f"data.root does not exist: '{root}'")
        if channels not in (1, 3):
            raise UserError(f"data.kwargs.channels must be 1 or 3; got {channels}")
        self.root = Path(root).expanduser()
        self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if len(self.class_names) < 2:
            raise UserError(f"data.root '{root}' needs at least two class sub-folders")
        self.num_classes = len(self.class_names)
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.input_shape = (channels, image_size, image_size)
        self.preprocessing = {
            "source": f"image folder {self.root}",
            "decode": "PIL, converted to " + ("L" if channels == 1 else "RGB"),
            "resize": f"bilinear to {image_size}x{image_size}",
            "scale": "pixel / 255",
            "normalize": "(x - mean) / std, per channel, train-split statistics",
            "layout": "NCHW float32",
        }

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
        from PIL import Image

        images: list[np.ndarray] = []
        labels: list[int] = []
        mode = "L" if self.channels == 1 else "RGB"
        for label, cls in enumerate(self.class_names):
            for file in sorted((self.root / cls).iterdir()):
                if file.suffix.lower() not in self.EXTENSIONS:
                    continue
                try:
                    with Image.open(file) as im:
                        im = im.convert(mode).resize((self.image_size,) * 2, Image.BILINEAR)
                        arr = np.asarray(im, dtype=np.float32) / 255.0
                except OSError:
                    raise UserError(f"cannot read image '{file}'") from None
                images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
                labels.append(label)
        if not images:
            raise UserError(f"no images found under data.root '{self.root}'")
        y = np.asarray(labels)
        tr, va, te = _split_indices(y, self.val_fraction, self.test_fraction, self.split_seed)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(y), {
            "train": tr, "val": va, "test": te,
        }


BUILTIN = {
    "digits": DigitsDataModule,
    "cifar10": CIFAR10DataModule,
    "image_folder": ImageFolderDataModule,
}


def first_batches(loader: DataLoader, n: int) -> list[torch.Tensor]:
    """The inputs of the first ``n`` batches (for calibration and parity checks)."""
    out = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        out.append(batch[0] if isinstance(batch, Sequence) else batch)
    return out
