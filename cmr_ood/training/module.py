"""LightningModule: the maths of training (losses, metrics, optimiser) for every training mode.

One module, three modes, chosen by ``tasks`` (loss weights by task name) in the YAML config:
- supervised segmentation: ``{seg: 1}``;
- multi-task: segmentation and proxy tasks on the same network, e.g. ``{seg: 1, mim: 1, position: 1}``;
- pretraining: proxy tasks only, on unlabelled slices, e.g. ``{mim: 1}`` or ``{simclr: 1}``.
With masked image modelling, ``mim_share`` of each batch is also seen masked (in the same forward pass as
the clean batch) and reconstructed. The contrastive tasks (SimCLR, PCL, DINO) compare two augmented views
of each slice on the encoder alone; their heads (and DINO's EMA teacher) live in this module, not in the
network, so they are optimised but never exported. ``task_options`` passes settings to a task's class
(e.g. ``{dino: {local_crops: 4}}``). Fine-tuning starts from ``init_weights`` (a state dict exported by
pretraining), with the encoder frozen (``freeze_encoder``) or trained.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from torch import nn

from cmr_ood.data.io import atomic_write
from cmr_ood.data.labels import STRUCTURES, most_probable, one_hot
from cmr_ood.networks import CMRUNet, load_weights
from cmr_ood.ssl import DINO, MaskedImageModelling, PositionalContrastiveLearning, SimCLR, SlicePosition
from cmr_ood.ssl.contrastive import pooled_features

PIXEL_TASKS = {"mim": MaskedImageModelling, "position": SlicePosition}  # a head on the last decoder map
CONTRASTIVE_TASKS = {"simclr": SimCLR, "pcl": PositionalContrastiveLearning, "dino": DINO}  # on the pooled encoder
PROXY_TASKS = {**PIXEL_TASKS, **CONTRASTIVE_TASKS}


class SegmentationModule(pl.LightningModule):
    def __init__(
        self,
        network: CMRUNet,
        tasks: dict[str, float] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 3e-5,
        warmup_steps: int = 200,
        mim_share: float = 0.5,
        task_options: dict[str, dict] | None = None,
        init_weights: str | None = None,
        freeze_encoder: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.tasks = dict(tasks or {"seg": 1.0})
        unknown = set(self.tasks) - {"seg", *PROXY_TASKS}
        if unknown:
            raise ValueError(f"tasks {sorted(unknown)}: choose among 'seg', {', '.join(map(repr, PROXY_TASKS))}")
        options = dict(task_options or {})
        proxy_names = sorted(set(self.tasks) - {"seg"})
        stray = sorted(set(options) - set(proxy_names))
        if stray:
            raise ValueError(f"task_options for {stray}: options are for the proxy tasks in use, {proxy_names}")
        self.network = network
        self.proxies = {}
        for name in self.tasks:
            if name in PIXEL_TASKS:
                self.proxies[name] = PIXEL_TASKS[name](**options.get(name, {}))
                network.add_head(name, self.proxies[name].channels)
        if init_weights:
            load_weights(network, init_weights, strict=False)
        # after the weights are loaded: DINO's teacher starts as a copy of the (pretrained) encoder
        self.contrastive = nn.ModuleDict({
            name: CONTRASTIVE_TASKS[name].for_encoder(network.encoder, network.channels[-1], **options.get(name, {}))
            for name in self.tasks if name in CONTRASTIVE_TASKS})
        self.proxies.update(self.contrastive)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self.dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)

    @property
    def views_per_slice(self) -> int:
        """Augmented views of each slice that a training batch must hold (the datamodule reads it)."""
        return max((task.views for task in self.contrastive.values()), default=1)

    def setup(self, stage: str) -> None:
        if self.hparams.freeze_encoder:
            self.network.encoder.requires_grad_(False)
        if self.hparams.channels_last:
            self.network.to(memory_format=torch.channels_last)
            self.contrastive.to(memory_format=torch.channels_last)  # DINO's teacher encoder
        if self.hparams.compile:
            self.network.compile()  # in place: the state dict keeps its keys, so exports stay loadable

    def _heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network.forward_heads(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(x)["seg"]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder alone, its bottleneck averaged over the image: (N, C), what the contrastive tasks compare."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return pooled_features(self.network.encoder, x)

    def task_losses(self, batch: dict, tasks) -> dict[str, torch.Tensor]:
        """The losses of ``tasks`` on a batch (``image``, ``label``, ``position``; ``labelled`` marks the
        slices whose labels count when some are unlabelled; ``views`` (V, B, 1, H, W) for contrastive tasks)."""
        images, losses = batch["image"], {}
        contrastive = [name for name in tasks if name in self.contrastive]
        if contrastive and batch.get("views") is None:
            raise ValueError(f"tasks {contrastive} need {self.views_per_slice} augmented views of each slice in batch['views'] "
                             f"(SliceDataModule adds them for this module's views_per_slice)")
        for name in contrastive:
            losses[name] = self.contrastive[name].loss(self.embed, batch["views"], batch["position"])
        clean = "seg" in tasks or "position" in tasks
        if "mim" in tasks:  # the masked slices go through the network in the same pass as the clean ones
            mim = self.proxies["mim"]
            # the batch's end: with a low-label subset, the slices drawn from all (mostly unlabelled) ones
            originals = images[len(images) - max(1, round(len(images) * self.hparams.mim_share)):] if clean else images
            mask = mim.mask(originals)
            masked = mim.corrupt(originals, mask)
            out = self._heads(torch.cat([images, masked]) if clean else masked)
            losses["mim"] = mim.loss(out["mim"][len(out["mim"]) - len(masked):], originals, mask)
        elif clean:
            out = self._heads(images)
        if "seg" in tasks:
            labelled = batch.get("labelled")
            logits, labels = out["seg"][: len(images)], batch["label"]
            if labelled is not None:
                logits, labels = logits[labelled], labels[labelled]
            if len(labels):
                losses["seg"] = self.loss(logits.float(), labels[:, None])
        if "position" in tasks:
            losses["position"] = self.proxies["position"].loss(out["position"][: len(images)], batch["position"])
        return losses

    def training_step(self, batch, batch_idx):
        losses = self.task_losses(batch, self.tasks)
        loss = sum(self.tasks[name] * value for name, value in losses.items())
        n = len(batch["image"])
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.contrastive:
            self.update_teachers(self.global_step / max(1, self.trainer.estimated_stepping_batches))

    def update_teachers(self, progress: float) -> None:
        """EMA teachers (DINO) follow the student after each optimiser step; ``progress`` 0..1 through training."""
        for task in self.contrastive.values():
            task.update_teacher(self.network.encoder, progress)

    def validation_step(self, batch, batch_idx):  # one volume: image (Z, 1, H, W), label (Z, H, W)
        if "seg" in self.tasks:
            self.dice(one_hot(most_probable(self(batch["image"]), 1)), one_hot(batch["label"]))
        # contrastive losses depend on random views and on which slices share a batch: not validated
        pixel_tasks = [name for name in self.proxies if name in PIXEL_TASKS]
        for name, value in self.task_losses(batch, pixel_tasks).items():
            self.log(f"val/loss_{name}", value, batch_size=1, sync_dist=True)

    def on_validation_epoch_end(self):
        if "seg" not in self.tasks:
            return
        per_class = self.dice.aggregate()
        self.dice.reset()
        for name, label in STRUCTURES.items():
            self.log(f"val/dice_{name}", per_class[label - 1], sync_dist=True)
        self.log("val/dice_mean", per_class.nanmean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # the network and the contrastive heads
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
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
