from cmr_ood.networks.unet import CMRUNet, load_weights

__all__ = ["CMRUNet", "load_weights"]
