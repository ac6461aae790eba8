"""Bring your own model and data: a complete, small example for `recipes/byo_example.yaml`.

Run from the repository root (the current directory is importable for `_target_`):

    distill train recipes/byo_example.yaml

Any `nn.Module` subclass can be a teacher or student and any `LightningDataModule` subclass
can be the data; `distill` passes `in_channels` and `num_classes` to a model class that takes
them. A data module must provide `input_shape` (C, H, W), `num_classes`, `train_dataloader()`
and `val_dataloader()` yielding `(x, y)` batches; `test_dataloader()`, `preprocessing` (a
dict written to the model card) and `class_names` are used when present.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    """A user's own CNN: two conv layers and a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class NoisyBarsDataModule(pl.LightningDataModule):
    """A user's own data: 16x16 images of a bar at one of 4 orientations, with noise."""

    num_classes = 4
    class_names = ["horizontal", "vertical", "diagonal", "anti-diagonal"]
    input_shape = (1, 16, 16)

    def __init__(self, n: int = 800, noise: float = 0.8, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.n, self.noise, self.batch_size, self.seed = n, noise, batch_size, seed
        self.preprocessing = {"source": "synthetic bars", "layout": "NCHW float32",
                              "normalize": "none (noise ~ N(0, noise^2))"}
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 4, n)
        x = rng.normal(0, noise, (n, 1, 16, 16)).astype(np.float32)
        idx = np.arange(16)
        for i, c in enumerate(y):
            pos = rng.integers(3, 13)
            if c == 0:
                x[i, 0, pos, :] += 2.0
            elif c == 1:
                x[i, 0, :, pos] += 2.0
            elif c == 2:
                x[i, 0, idx, idx] += 2.0
            else:
                x[i, 0, idx, 15 - idx] += 2.0
        data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
        cut1, cut2 = int(0.6 * n), int(0.8 * n)
        self._train = torch.utils.data.Subset(data, range(cut1))
        self._val = torch.utils.data.Subset(data, range(cut1, cut2))
        self._test = torch.utils.data.Subset(data, range(cut2, n))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._test, batch_size=self.batch_size)
