from cmr_ood.networks.unet import CMRUNet

__all__ = ["CMRUNet"]
