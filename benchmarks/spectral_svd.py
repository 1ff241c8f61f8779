"""Speed of the singular values behind the spectral OOD signature, three ways, side by side in one run.

A case's deepest feature map (Z slices x C channels x h x w) becomes a (Z h w) x C matrix; the signature
needs its C singular values. Compared on a batch of cases: ``gram`` (C x C Gram matrices, one batched
eigvalsh), ``svd`` (one batched svdvals of the tall matrices), ``loop`` (one svdvals per case). Prints
milliseconds per batch and each method's ratio to the fastest, and the largest disagreement.

    python benchmarks/spectral_svd.py                  # CUDA if available, else CPU
    python benchmarks/spectral_svd.py --cases 64 --channels 256 --positions 2000
"""

from __future__ import annotations

import argparse

import torch
from train_throughput import timed  # benchmarks/ is the script's folder, so on the path

from cmr_ood.ood.features import singular_values

METHODS = ("gram", "svd", "loop")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--channels", type=int, default=256, help="channels of the deepest layer (shipped model: 256)")
    parser.add_argument("--positions", type=int, default=1690, help="Z*h*w per case (10 slices of 13 x 13: 1690)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    features = torch.randn(args.cases, args.channels, args.positions, device=device).relu()  # post-activation maps
    results = {m: timed(lambda m=m: singular_values(features, m), args.repeats, 1, device) / args.repeats * 1000 for m in METHODS}
    reference = singular_values(features.double(), "loop")
    fastest = min(results.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.cases} cases of {args.positions} x {args.channels} on {device} ({name})")
    for m, ms in results.items():
        error = (singular_values(features, m) - reference).abs().max() / reference.abs().max()
        print(f"  {m:5s} {ms:9.2f} ms per batch  x{ms / fastest:6.2f} of the fastest  max relative deviation {float(error):.1e}")


if __name__ == "__main__":
    main()
