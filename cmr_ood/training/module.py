"""LightningModule for segmentation: the maths of training (loss, metrics, optimiser)."""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric

from cmr_ood.data.io import atomic_write
from cmr_ood.data.labels import STRUCTURES, one_hot
from cmr_ood.networks import CMRUNet


class SegmentationModule(pl.LightningModule):
    def __init__(
        self,
        network: CMRUNet,
        lr: float = 2e-3,
        weight_decay: float = 3e-5,
        warmup_steps: int = 200,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self.dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.network.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.network.compile()  # in place: the state dict keeps its keys, so exports stay loadable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss(self(images).float(), labels[:, None])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch  # one volume: (Z, 1, H, W), (Z, H, W)
        self.dice(one_hot(self(images).argmax(1)), one_hot(labels))

    def on_validation_epoch_end(self):
        per_class = self.dice.aggregate()
        self.dice.reset()
        for name, label in STRUCTURES.items():
            self.log(f"val/dice_{name}", per_class[label - 1], prog_bar=False)
        self.log("val/dice_mean", per_class.nanmean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.network.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 10)

        def schedule(step):  # linear warm-up, then cosine decay to zero
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExportNetwork(pl.Callback):
    """Saves the network's state dict (loadable with ``weights_only=True``) where a bundle expects it."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            state = {k: v.detach().cpu().contiguous() for k, v in pl_module.network.state_dict().items()}
            atomic_write(self.path, lambda tmp: torch.save(state, tmp), overwrite=True)
            print(f"exported network weights to {Path(self.path).resolve()}")
