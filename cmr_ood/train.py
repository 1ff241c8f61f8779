"""Training command line: ``python -m cmr_ood.train fit --config bundles/cmr_seg_ood/configs/train.yaml``."""

from pytorch_lightning.cli import LightningCLI

from cmr_ood.data.datamodule import SliceDataModule
from cmr_ood.training.module import SegmentationModule


def main(args=None):
    return LightningCLI(SegmentationModule, SliceDataModule, seed_everything_default=0,
                        save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
