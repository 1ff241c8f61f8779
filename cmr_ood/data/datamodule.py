"""LightningDataModule: slices cached on the training device, batches gathered and augmented there."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from cmr_ood.data.augment import BatchAugment
from cmr_ood.data.cache import cached
from cmr_ood.data.manifests import default_data_root, load_manifest, select
from cmr_ood.data.preprocess import Preprocessing


class SliceDataModule(pl.LightningDataModule):
    """Labelled slices of a manifest's folds (optionally a low-label subset, e.g. ``seed0/5``).

    The loaders yield only indices; :meth:`on_after_batch_transfer` gathers the slices from a copy of
    the cache held on the batch's device and augments them there.
    """

    def __init__(
        self,
        manifest: str = "data_manifests/acdc.json",
        data_root: str | None = None,
        train_folds: list[int] = (1, 2, 3, 4),
        val_folds: list[int] = (0,),
        low_label: str | None = None,
        preprocessing: Preprocessing | None = None,
        augment: BatchAugment | None = None,
        canvas: int = 224,
        batch_size: int = 32,
        steps_per_epoch: int = 100,
        cache_dir: str = "cache",
    ):
        super().__init__()
        self.manifest_path = manifest
        self.data_root = Path(data_root) if data_root else default_data_root()
        self.train_folds, self.val_folds = list(train_folds), list(val_folds)
        self.low_label = low_label
        self.preprocessing = preprocessing or Preprocessing()
        self.augment = augment or BatchAugment()
        self.canvas, self.batch_size, self.steps_per_epoch = canvas, batch_size, steps_per_epoch
        self.cache_dir = Path(cache_dir)
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}

    def _entries(self, folds, subjects=None) -> list[dict]:
        return [e for e in select(self.manifest, folds=folds, subjects=subjects) if e.get("label")]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_data"):
            return
        self.manifest = load_manifest(self.manifest_path)
        subjects = None
        if self.low_label:
            seed, size = self.low_label.split("/")
            subjects = self.manifest["low_label"][seed][size]
        build = lambda entries: {k: torch.from_numpy(v) for k, v in cached(  # noqa: E731
            entries, self.data_root, self.preprocessing, self.canvas, self.cache_dir).items()}
        self.train_entries = self._entries(self.train_folds, subjects)
        self.val_entries = self._entries(self.val_folds)
        if not self.train_entries:
            raise ValueError(f"{self.manifest_path}: no labelled entries in folds {self.train_folds} (low_label={self.low_label})")
        self.train_data = build(self.train_entries)
        self.val_data = build(self.val_entries) if self.val_entries else None
        if self.val_data is not None:
            volume = self.val_data["volume"].long()
            counts = torch.bincount(volume, minlength=len(self.val_entries))
            self.val_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    def train_dataloader(self) -> DataLoader:
        n = len(self.train_data["images"])
        sampler = torch.utils.data.RandomSampler(range(n), replacement=True, num_samples=self.steps_per_epoch * self.batch_size)
        return DataLoader(range(n), batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        return DataLoader(range(len(self.val_entries)), batch_size=None)

    def _device_data(self, name: str, device: torch.device) -> dict[str, torch.Tensor]:
        key = f"{name}:{device}"
        if key not in self._on_device:
            data = self.train_data if name == "train" else self.val_data
            self._on_device[key] = {k: v.to(device) for k, v in data.items()}
        return self._on_device[key]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        device = batch.device if isinstance(batch, torch.Tensor) else torch.device("cpu")
        if self.trainer is not None and self.trainer.training:
            data = self._device_data("train", device)
            images = data["images"][batch].unsqueeze(1).float() / 255.0
            return self.augment(images, data["labels"][batch])
        data = self._device_data("val", device)
        i = int(batch)
        start, stop = int(self.val_offsets[i]), int(self.val_offsets[i + 1])
        return data["images"][start:stop].unsqueeze(1).float() / 255.0, data["labels"][start:stop].long()
