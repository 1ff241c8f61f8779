"""Training command line: ``python -m cmr_ood.train fit --config bundles/cmr_seg_ood/configs/train.yaml``.

A run saves ``<default_root_dir>/checkpoints/last.ckpt`` every ``checkpoint_every_n_steps`` training steps, and
``--ckpt_path last`` resumes from it: a run killed at any step, resumed with the same command plus
``--ckpt_path last``, ends with the weights of an uninterrupted run (the datamodule checkpoints its random draws).
"""

import os

import fsspec
import torch
from jsonargparse import Namespace
from monai.utils.module import locate
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins import CheckpointIO, TorchCheckpointIO

from cmr_ood.data.datamodule import SliceDataModule
from cmr_ood.data.io import atomic_write
from cmr_ood.training.module import SegmentationModule


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint under a temporary name beside it, then renames it, so that a process killed while
    saving leaves the previous ``last.ckpt`` whole. (Lightning's own writer stages the file in the system's
    temporary folder and moves it: a copy, not a rename, where that folder is on another file system.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) not in ("file", "local"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), overwrite=True)


class TrainingCLI(LightningCLI):
    """LightningCLI that adds a resumable checkpoint unless the configuration brings its own (or disables them),
    and writes checkpoints atomically unless it brings its own CheckpointIO."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=50,
                            help="Training steps between two saves of <trainer.default_root_dir>/checkpoints/last.ckpt, "
                                 "which `--ckpt_path last` resumes from (0: no such checkpoint).")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        trainer, every = config.trainer, config.checkpoint_every_n_steps
        callbacks, plugins = _as_list(trainer.callbacks), _as_list(trainer.plugins)
        if every > 0 and trainer.enable_checkpointing is not False and not any(_configures(c, ModelCheckpoint) for c in callbacks):
            # A fixed folder: Lightning's default (the logger's version_N/checkpoints) changes from run to run, so
            # that `--ckpt_path last` would look for the previous run's checkpoint in the new, empty version folder.
            # Only last.ckpt is kept (save_top_k 0).
            dirpath = os.path.join(trainer.default_root_dir or os.getcwd(), "checkpoints")
            init_args = Namespace(dirpath=dirpath, every_n_train_steps=every, save_last=True, save_top_k=0)
            trainer.callbacks = [*callbacks, Namespace(class_path=_class_path(ModelCheckpoint), init_args=init_args)]
        if not any(_configures(p, CheckpointIO) for p in plugins):
            trainer.plugins = [*plugins, Namespace(class_path=_class_path(AtomicCheckpointIO), init_args=Namespace())]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _configures(item, cls: type) -> bool:
    """Whether a configured callback or plugin (an instance or a class_path namespace) is a ``cls``."""
    if isinstance(item, Namespace):
        return issubclass(locate(item.class_path), cls)
    return isinstance(item, cls)


def main(args=None):
    return TrainingCLI(SegmentationModule, SliceDataModule, seed_everything_default=0,
                       save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
