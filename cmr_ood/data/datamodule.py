"""LightningDataModule: slices cached on the training device, batches gathered and augmented there."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Sampler

from cmr_ood.data.augment import BatchAugment
from cmr_ood.data.cache import cache_file, cached, entry_key
from cmr_ood.data.manifests import default_data_root, load_manifest, select
from cmr_ood.data.preprocess import Preprocessing
from cmr_ood.ssl.positions import relative_slice_positions

SLICES, STEP = 0, 1  # the streams of a training batch's draws: which slices; their augmentation and the training step


def batch_seed(seed: int, batch: int, stream: int) -> int:
    """The seed of draw ``stream`` of batch ``batch`` in a run seeded ``seed``. NumPy's SeedSequence hashes the
    three numbers, so that neighbouring batches and streams get unrelated random sequences."""
    return int(np.random.SeedSequence([seed, batch, stream]).generate_state(1, np.uint64)[0])


class MixedBatches(Sampler):
    """A stream of batches of slice indices drawn with replacement, ``steps`` to an epoch: ``labelled_share`` of
    each batch from the labelled slices, the rest from all slices (labelled or not). Each process of a
    distributed run draws its own batches (``seed`` differs by rank), so no distributed sampler is needed.

    Batch ``t`` of the stream is drawn from its own generator, seeded by (``seed``, ``t``): it is the same
    whatever was drawn before it. Iterating yields the rest of the epoch that holds ``position``, the
    stream index of the next batch to train on. Lightning fetches one batch ahead of the one it trains on,
    so the consumer, not the iterator, advances ``position`` (:class:`SliceDataModule` does when a batch
    reaches the device): a checkpoint records the batches trained on, and a run resumed from it draws the
    ones that follow, mid-epoch included.
    """

    def __init__(self, labelled: torch.Tensor, total: int, batch_size: int, steps: int, labelled_share: float, seed: int = 0,
                 position: int = 0):
        self.labelled, self.total, self.batch_size, self.steps = labelled, total, batch_size, steps
        self.n_labelled = max(1, round(batch_size * labelled_share)) if labelled_share > 0 else 0
        self.seed, self.position = seed, position

    def __len__(self) -> int:
        return self.steps

    def batch(self, t: int) -> list[int]:
        """Batch ``t`` of the stream."""
        generator = torch.Generator().manual_seed(batch_seed(self.seed, t, SLICES))
        first = self.labelled[torch.randint(len(self.labelled), (self.n_labelled,), generator=generator)]
        rest = torch.randint(self.total, (self.batch_size - self.n_labelled,), generator=generator)
        return torch.cat([first, rest]).tolist()

    def __iter__(self):
        start = self.position
        for t in range(start, (start // self.steps + 1) * self.steps):
            yield self.batch(t)


class SliceDataModule(pl.LightningDataModule):
    """Slices of a manifest's training folds, all labelled or, with ``low_label`` (e.g. ``seed0/5``), only
    the subset's; with ``unlabelled`` the other training subjects join as unlabelled slices (for the proxy
    tasks), and half of each batch comes from the labelled ones. Entries without a label are left out; in a
    manifest derived by pseudo-labelling (:func:`cmr_ood.training.pseudo_labels.pseudo_label`), entries marked
    ``pseudo_label`` count as labelled whatever the ``low_label`` subset.

    The loaders yield only indices; :meth:`on_after_batch_transfer` gathers the slices from a copy of
    the cache held on the batch's device and augments them there. A batch is a dict: ``image`` (B, 1,
    H, W) float, ``label`` (B, H, W) long, ``position`` (B,) relative slice position in its stack, and
    ``labelled`` (B,) bool when some slices are unlabelled (else None). When the LightningModule asks for
    several augmented views of each slice (its ``views_per_slice``, e.g. 2 for contrastive tasks), the
    batch also holds ``views`` (V, B, 1, H, W), of which ``image`` is the first (``label`` matches it).

    Training batch ``t`` depends on (``seed``, rank, ``t``) alone: its slices come from :class:`MixedBatches`,
    and before augmenting it the datamodule reseeds torch's global generators (CPU and CUDA) from the same
    three numbers, so its augmentation and whatever the training step draws after it (MIM masks, DINO crops)
    follow too. The checkpointed state (:meth:`state_dict`: the seed and the number of batches trained on) is
    then all a resumed run needs to draw what the uninterrupted run would have drawn. ``seed`` is the seed
    set by ``seed_everything`` (LightningCLI's ``seed_everything``) when the datamodule is set up.
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
        self.seed: int | None = None
        self.batches_taken = 0  # training batches handed to the model so far (all epochs): the stream index of the next
        self._train_batches: MixedBatches | None = None

    def _entries(self, folds) -> list[dict]:
        return [e for e in select(self.manifest, folds=folds) if e.get("label")]

    def _cached_entries(self) -> list[dict]:
        """The labelled entries of the training and validation folds together, in manifest order: one cache
        for both, the same for every split of these folds (the five runs of a cross-validation share it)."""
        return self._entries(sorted(set(self.train_folds) | set(self.val_folds)))

    @staticmethod
    def _volumes_of(data: dict[str, np.ndarray], cached_entries: list[dict], entries: list[dict]) -> dict[str, torch.Tensor]:
        """The slices of ``entries`` (a subset of ``cached_entries``, both in manifest order, so the cache holds
        them in ``entries``' order), their volumes renumbered 0, 1, ..."""
        index = {entry_key(e): i for i, e in enumerate(cached_entries)}
        renumber = torch.full((len(cached_entries),), -1, dtype=torch.long)
        renumber[torch.tensor([index[entry_key(e)] for e in entries], dtype=torch.long)] = torch.arange(len(entries))
        volume = renumber[torch.from_numpy(data["volume"]).long()]
        keep = torch.nonzero(volume >= 0).squeeze(1)
        out = {k: torch.from_numpy(data[k])[keep] for k in ("images", "labels")}
        out["volume"] = volume[keep].to(torch.int32)
        out["position"] = relative_slice_positions(out["volume"])
        return out

    def prepare_data(self) -> None:
        """Build the slice cache once (Lightning calls this in one process before the others read it)."""
        self.manifest = load_manifest(self.manifest_path)
        entries = self._cached_entries()
        if entries and not cache_file(entries, self.preprocessing, self.canvas, self.cache_dir).exists():
            cached(entries, self.data_root, self.preprocessing, self.canvas, self.cache_dir)  # read once, in setup

    def setup(self, stage: str | None = None) -> None:
        if self.seed is None:
            self.seed = torch.initial_seed()  # seed_everything's: each training batch reseeds the global generators
        if hasattr(self, "train_data"):
            return
        self.manifest = load_manifest(self.manifest_path)
        self.train_entries = self._entries(self.train_folds)
        self.val_entries = self._entries(self.val_folds)
        if not self.train_entries:
            raise ValueError(f"{self.manifest_path}: no labelled entries in folds {self.train_folds}")
        # one cache for the training and validation folds; a low-label subset only marks which slices are labelled
        cached_entries = self._cached_entries()
        data = cached(cached_entries, self.data_root, self.preprocessing, self.canvas, self.cache_dir)
        self.train_data = self._volumes_of(data, cached_entries, self.train_entries)
        labelled_volumes = torch.ones(len(self.train_entries), dtype=torch.bool)
        if self.low_label:
            seed, size = self.low_label.split("/")
            subjects = set(self.manifest["low_label"][seed][size])
            # pseudo-labelled entries of a derived manifest (cmr_ood.training.pseudo_labels) count as labelled too
            labelled_volumes = torch.tensor([e["subject"] in subjects or bool(e.get("pseudo_label")) for e in self.train_entries])
            if not labelled_volumes.any():
                raise ValueError(f"{self.manifest_path}: low-label subset {self.low_label} has no subject in folds {self.train_folds}")
        self.labelled = labelled_volumes[self.train_data["volume"].long()]
        self.val_data = self._volumes_of(data, cached_entries, self.val_entries) if self.val_entries else None
        if self.val_data is not None:
            counts = torch.bincount(self.val_data["volume"].long(), minlength=len(self.val_entries))
            self.val_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    @property
    def mixes_unlabelled(self) -> bool:
        return self.unlabelled and not bool(self.labelled.all())

    def train_dataloader(self) -> DataLoader:
        labelled = torch.nonzero(self.labelled).squeeze(1)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        seed = (self.seed + 1000 * rank) % 2**63  # seed_everything sets the same seed on every rank
        share = 0.5 if self.mixes_unlabelled else 1.0  # else every slice of a batch is labelled
        self._train_batches = MixedBatches(labelled, len(self.labelled), self.batch_size, self.steps_per_epoch, share, seed,
                                           position=self.batches_taken)
        return DataLoader(range(len(self.labelled)), batch_sampler=self._train_batches)

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to continue the stream of training batches (saved in Lightning checkpoints)."""
        return {"seed": self.seed, "batches_taken": self.batches_taken}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        missing = {"seed", "batches_taken"} - set(state_dict)
        if missing:
            raise ValueError(f"{type(self).__name__} state: {sorted(missing)} missing (a checkpoint of another version?)")
        self.seed, self.batches_taken = int(state_dict["seed"]), int(state_dict["batches_taken"])
        if self._train_batches is not None:
            self._train_batches.position = self.batches_taken
        # Lightning warns that a loader without a state_dict cannot resume mid-epoch: this one's position is restored here
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended", PossibleUserWarning)

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
            sampler = self._train_batches
            torch.manual_seed(batch_seed(sampler.seed, self.batches_taken, STEP))  # CPU and CUDA generators
            self.batches_taken += 1
            sampler.position = self.batches_taken  # the iterator may have drawn further: Lightning fetches ahead
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
