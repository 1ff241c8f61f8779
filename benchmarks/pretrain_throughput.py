"""Self-supervised pretraining throughput (slices/s) of each method, measured side by side in one run.

Every method trains the same way as ``python -m cmr_ood.train fit --config configs/pretrain_<method>.yaml``
(its network and task options; masked image modelling on the network of train.yaml): the slice cache
sits on the device, each batch is gathered and augmented there (two views of each slice for the
contrastive methods), one optimiser step goes through SegmentationModule's own losses, and DINO's teacher
follows. bf16 autocast and channels-last on CUDA, fp32 on the CPU. A slice counts once however many
views or crops of it the method looks at.

    python benchmarks/pretrain_throughput.py                          # ACDC training folds, the recipes' settings
    python benchmarks/pretrain_throughput.py --synthetic --steps 3 --batch-size 8 --canvas 64 --patch 48 \\
        --channels 4 8 16 --num-res-units 1                           # tiny settings, runs on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from cmr_ood.data.augment import BatchAugment
from cmr_ood.networks import CMRUNet
from cmr_ood.training.module import SegmentationModule

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood" / "configs"


def recipe(method: str) -> dict:
    """The YAML config a method pretrains with (train.yaml's network for the pixel tasks)."""
    path = CONFIGS / f"pretrain_{method}.yaml"
    return yaml.safe_load((path if path.exists() else CONFIGS / "train.yaml").read_text())


def load_slices(args, device) -> dict[str, torch.Tensor]:
    """uint8 slices, labels and relative slice positions, on ``device``."""
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        shape = (512, args.canvas, args.canvas)
        data = {"images": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
                "labels": torch.randint(0, 4, shape, dtype=torch.uint8, generator=g), "position": torch.rand(512, generator=g)}
    else:
        from cmr_ood.data.datamodule import SliceDataModule

        dm = SliceDataModule(canvas=args.canvas)
        dm.setup("fit")
        data = {k: dm.train_data[k] for k in ("images", "labels", "position")}
    return {k: v.to(device) for k, v in data.items()}


def measure(method: str, data: dict[str, torch.Tensor], args, device) -> list[float]:
    """Slices per second of ``args.steps`` optimiser steps, ``args.repeats`` times, after ``args.warmup`` untimed ones."""
    config = recipe(method)
    network_args = dict(config["model"]["network"]["init_args"])
    if args.channels:
        network_args.update(channels=args.channels, num_res_units=args.num_res_units)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    module = SegmentationModule(CMRUNet(**network_args), tasks={method: 1.0}, task_options=config["model"].get("task_options"),
                                channels_last=cuda).to(device)
    module.setup("fit")
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    augment = BatchAugment(patch_size=args.patch)
    n_views = module.views_per_slice

    def step():
        idx = torch.randint(len(data["images"]), (args.batch_size,), device=device)
        views, labels = augment.views(data["images"][idx].unsqueeze(1).float() / 255.0, data["labels"][idx], n_views)
        batch = {"image": views[0], "label": labels[0], "position": data["position"][idx], "labelled": None, "views": views}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = sum(module.task_losses(batch, module.tasks).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.update_teachers(progress=0.0)

    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["simclr", "pcl", "dino", "mim"])
    parser.add_argument("--synthetic", action="store_true", help="random slices instead of the ACDC cache")
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median and best are printed)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipes' (256) on CUDA, 16 on the CPU")
    parser.add_argument("--canvas", type=int, default=None, help="default: the recipes' (192)")
    parser.add_argument("--patch", type=int, default=None, help="augmented view size; default: the recipes' (128)")
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="network channels instead of the recipes'")
    parser.add_argument("--num-res-units", type=int, default=1, help="with --channels")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = recipe(args.methods[0])["data"]
    args.batch_size = args.batch_size or (defaults["batch_size"] if device.type == "cuda" else 16)
    args.canvas = args.canvas or defaults["canvas"]
    args.patch = args.patch or defaults["augment"]["patch_size"]
    data = load_slices(args, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    network = f"channels {args.channels}, {args.num_res_units} res unit(s)" if args.channels else "the recipes' network"
    print(f"device {name}; {len(data['images'])} slices on it; batch {args.batch_size}; canvas {args.canvas}; "
          f"views {args.patch}px; {network}; {args.repeats} x {args.steps} timed steps")
    print(f"{'method':<10}{'slices/s median':>18}{'best':>10}")
    for method in args.methods:
        rates = measure(method, data, args, device)
        print(f"{method:<10}{statistics.median(rates):>18.1f}{max(rates):>10.1f}", flush=True)


if __name__ == "__main__":
    main()
