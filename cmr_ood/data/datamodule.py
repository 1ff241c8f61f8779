"""LightningDataModule: slices cached on the training device, batches gathered and augmented there."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from cmr_ood.data.augment import BatchAugment
from cmr_ood.data.cache import cached
from cmr_ood.data.manifests import default_data_root, load_manifest, select
from cmr_ood.data.preprocess import Preprocessing
from cmr_ood.ssl.positions import relative_slice_positions


class MixedBatches(Sampler):
    """``steps`` batches of slice indices drawn with replacement: ``labelled_share`` of each batch from the
    labelled slices, the rest from all slices (labelled or not). Each process of a distributed run draws
    its own batches (``seed`` differs by rank), so no distributed sampler is needed."""

    def __init__(self, labelled: torch.Tensor, total: int, batch_size: int, steps: int, labelled_share: float, seed: int = 0):
        self.labelled, self.total, self.batch_size, self.steps = labelled, total, batch_size, steps
        self.n_labelled = max(1, round(batch_size * labelled_share)) if labelled_share > 0 else 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            first = self.labelled[torch.randint(len(self.labelled), (self.n_labelled,), generator=self.generator)]
            rest = torch.randint(self.total, (self.batch_size - self.n_labelled,), generator=self.generator)
            yield torch.cat([first, rest]).tolist()


class SliceDataModule(pl.LightningDataModule):
    """Slices of a manifest's training folds, all labelled or, with ``low_label`` (e.g. ``seed0/5``), only
    the subset's; with ``unlabelled`` the other training subjects join as unlabelled slices (for the proxy
    tasks), and half of each batch comes from the labelled ones.

    The loaders yield only indices; :meth:`on_after_batch_transfer` gathers the slices from a copy of
    the cache held on the batch's device and augments them there. A batch is a dict: ``image`` (B, 1,
    H, W) float, ``label`` (B, H, W) long, ``position`` (B,) relative slice position in its stack, and
    ``labelled`` (B,) bool when some slices are unlabelled (else None). When the LightningModule asks for
    several augmented views of each slice (its ``views_per_slice``, e.g. 2 for contrastive tasks), the
    batch also holds ``views`` (V, B, 1, H, W), of which ``image`` is the first (``label`` matches it).
    """

    def __init__(
        self,
        manifest: str = "data_manifests/acdc.json",
        data_root: str | None = None,
        train_folds: list[int] = (1, 2, 3, 4),
        val_folds: list[int] = (0,),
        low_label: str | None = None,
        unlabelled: bool = False,
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
        self.low_label, self.unlabelled = low_label, unlabelled
        self.preprocessing = preprocessing or Preprocessing()
        self.augment = augment or BatchAugment()
        self.canvas, self.batch_size, self.steps_per_epoch = canvas, batch_size, steps_per_epoch
        self.cache_dir = Path(cache_dir)
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}

    def _entries(self, folds) -> list[dict]:
        return [e for e in select(self.manifest, folds=folds) if e.get("label")]

    def _build(self, entries: list[dict]) -> dict[str, torch.Tensor]:
        data = {k: torch.from_numpy(v) for k, v in cached(entries, self.data_root, self.preprocessing, self.canvas, self.cache_dir).items()}
        data["position"] = relative_slice_positions(data["volume"])
        return data

    def prepare_data(self) -> None:
        """Build the slice caches once (Lightning calls this in one process before the others read them)."""
        self.manifest = load_manifest(self.manifest_path)
        for entries in (self._entries(self.train_folds), self._entries(self.val_folds)):
            if entries:
                cached(entries, self.data_root, self.preprocessing, self.canvas, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_data"):
            return
        self.manifest = load_manifest(self.manifest_path)
        self.train_entries = self._entries(self.train_folds)
        self.val_entries = self._entries(self.val_folds)
        if not self.train_entries:
            raise ValueError(f"{self.manifest_path}: no labelled entries in folds {self.train_folds}")
        # one cache for the training folds; a low-label subset only marks which of its slices are labelled
        self.train_data = self._build(self.train_entries)
        labelled_volumes = torch.ones(len(self.train_entries), dtype=torch.bool)
        if self.low_label:
            seed, size = self.low_label.split("/")
            subjects = set(self.manifest["low_label"][seed][size])
            labelled_volumes = torch.tensor([e["subject"] in subjects for e in self.train_entries])
            if not labelled_volumes.any():
                raise ValueError(f"{self.manifest_path}: low-label subset {self.low_label} has no subject in folds {self.train_folds}")
        self.labelled = labelled_volumes[self.train_data["volume"].long()]
        self.val_data = self._build(self.val_entries) if self.val_entries else None
        if self.val_data is not None:
            counts = torch.bincount(self.val_data["volume"].long(), minlength=len(self.val_entries))
            self.val_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    @property
    def mixes_unlabelled(self) -> bool:
        return self.unlabelled and not bool(self.labelled.all())

    def train_dataloader(self) -> DataLoader:
        labelled = torch.nonzero(self.labelled).squeeze(1)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        seed = (torch.initial_seed() + 1000 * rank) % 2**63  # seed_everything sets the same seed on every rank
        share = 0.5 if self.mixes_unlabelled else 1.0  # else every slice of a batch is labelled
        sampler = MixedBatches(labelled, len(self.labelled), self.batch_size, self.steps_per_epoch, share, seed)
        return DataLoader(range(len(self.labelled)), batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        return DataLoader(range(len(self.val_entries)), batch_size=None)

    def _device_data(self, name: str, device: torch.device) -> dict[str, torch.Tensor]:
        key = f"{name}:{device}"
        if key not in self._on_device:
            data = self.train_data if name == "train" else self.val_data
            self._on_device[key] = {k: v.to(device) for k, v in data.items()}
            if name == "train":
                self._on_device[key]["labelled"] = self.labelled.to(device)
        return self._on_device[key]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.trainer is not None and self.trainer.training:
            data = self._device_data("train", device)
            n_views = getattr(self.trainer.lightning_module, "views_per_slice", 1)
            slices = data["images"][batch].unsqueeze(1).float() / 255.0
            images, labels = self.augment.views(slices, data["labels"][batch], n_views)
            out = {"image": images[0], "label": labels[0], "position": data["position"][batch],
                   "labelled": data["labelled"][batch] if self.mixes_unlabelled else None}
            if n_views > 1:
                out["views"] = images
            return out
        data = self._device_data("val", device)
        i = int(batch)
        start, stop = int(self.val_offsets[i]), int(self.val_offsets[i + 1])
        return {"image": data["images"][start:stop].unsqueeze(1).float() / 255.0, "label": data["labels"][start:stop].long(),
                "position": data["position"][start:stop]}
