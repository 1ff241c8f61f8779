"""Training throughput (slices/s) of cmr_ood's path against the usual MONAI pipeline, same network, one run.

cmr_ood: the slice cache on the device, batches gathered and augmented there (BatchAugment), bf16
autocast and channels-last on CUDA. Baseline: MONAI CacheDataset, CPU dictionary transforms with
DataLoader workers, fp32. Both train the same network with the same loss and optimiser; the figure is
the ratio of their steady-state throughputs.

    python benchmarks/train_throughput.py                      # ACDC training folds from the manifest
    python benchmarks/train_throughput.py --synthetic --steps 5  # random slices, no data needed
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import yaml
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss

from cmr_ood.data.augment import BatchAugment
from cmr_ood.networks import CMRUNet

RECIPE = os.path.join(os.path.dirname(__file__), "..", "bundles", "cmr_seg_ood", "configs", "train.yaml")


def load_slices(args) -> tuple[np.ndarray, np.ndarray]:
    if args.synthetic:
        rng = np.random.default_rng(0)
        shape = (512, args.canvas, args.canvas)
        return rng.integers(0, 255, shape, dtype=np.uint8), rng.integers(0, 4, shape, dtype=np.uint8)
    from cmr_ood.data.datamodule import SliceDataModule

    dm = SliceDataModule(canvas=args.canvas)
    dm.setup("fit")
    return dm.train_data["images"].numpy(), dm.train_data["labels"].numpy()


def timed(step, batches: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="random slices instead of the ACDC cache")
    parser.add_argument("--steps", type=int, default=50, help="timed optimiser steps per pipeline")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (256), 16 on CPU")
    parser.add_argument("--canvas", type=int, default=224)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="baseline DataLoader workers")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = yaml.safe_load(open(RECIPE))
    patch = recipe["data"]["augment"]["patch_size"]
    batch = args.batch_size or (recipe["data"]["batch_size"] if device.type == "cuda" else 16)
    images, labels = load_slices(args)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; {len(images)} slices; batch {batch}; patch {patch}")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def make_network(channels_last: bool):
        torch.manual_seed(0)
        net = CMRUNet(**recipe["model"]["network"]["init_args"]).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-3)

    # cmr_ood: everything on the device
    net, opt = make_network(channels_last=device.type == "cuda")
    dev_images, dev_labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    augment = BatchAugment(patch_size=patch)

    def ours():
        idx = torch.randint(0, len(dev_images), (batch,), device=device)
        x, y = augment(dev_images[idx].unsqueeze(1).float() / 255.0, dev_labels[idx])
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(net(x).float(), y[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_ours = timed(ours, args.steps, args.warmup, device)

    # the usual MONAI way: CacheDataset + CPU dictionary transforms + workers, fp32
    net, opt = make_network(channels_last=False)
    data = [{"image": images[i][None].astype(np.float32) / 255.0, "label": labels[i][None]} for i in range(len(images))]
    keys = ("image", "label")
    pipeline = mt.Compose([
        mt.RandRotated(keys, range_x=np.pi, prob=1.0, mode=("bilinear", "nearest")),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=0),
        mt.RandZoomd(keys, prob=1.0, min_zoom=0.75, max_zoom=1.35, mode=("bilinear", "nearest")),
        mt.RandSpatialCropd(keys, roi_size=(patch, patch), random_size=False),
        mt.RandAdjustContrastd("image", prob=0.5, gamma=(0.6, 1.6)),
        mt.RandGaussianNoised("image", prob=0.5, std=0.06),
        mt.ToTensord(keys),
    ])
    loader = DataLoader(CacheDataset(data, transform=pipeline, cache_rate=1.0, progress=False), batch_size=batch,
                        shuffle=True, num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0)
    stream = iter(())

    def baseline():
        nonlocal stream
        try:
            sample = next(stream)
        except StopIteration:
            stream = iter(loader)
            sample = next(stream)
        x, y = sample["image"].to(device).as_tensor(), sample["label"].to(device).as_tensor().long()
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_base = timed(baseline, args.steps, args.warmup, device)
    ours_rate, base_rate = args.steps * batch / t_ours, args.steps * batch / t_base
    print(f"{'pipeline':<44}{'slices/s':>10}")
    print(f"{'cmr_ood (device cache + batch augment)':<44}{ours_rate:>10.1f}")
    print(f"{'MONAI CacheDataset + CPU transforms, fp32':<44}{base_rate:>10.1f}")
    print(f"ratio cmr_ood / baseline: {ours_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
