"""Float32 against bfloat16 inference, side by side on the same volumes: segmentation and OOD agreement, speed.

The OOD state (temperature, feature statistics, thresholds) was fitted on float32 outputs: bfloat16 is only
safe where its scores stay close to the float32 ones and the flags agree. For each held-out volume, both
precisions run the bundle's segmenter and scorer (default and single-pass scores); prints the mean Dice of
each against the reference labels, the Dice between their labels, the largest change of each score (in
standard deviations of its in-distribution validation scores) and how many flags differ, and seconds per
volume (the two precisions alternate volume by volume, so that a change of load hits both alike).

    python benchmarks/inference_precision.py --data_root ../shared/data --cases 4
    python benchmarks/inference_precision.py --data_root ../shared/data --cases 40 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from inference_speed import bundle_runs

from cmr_ood.data.manifests import default_data_root, load_manifest, read_entry, select
from cmr_ood.ood.evaluate import mean_dice


def timed(segmenter, volume, scorer):
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)
    start = time.perf_counter()
    labels, scores, _ = segmenter.segment_and_score(volume, scorer)
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)
    return labels, scores, time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="data_manifests/acdc.json")
    ap.add_argument("--data_root", default=None, help="where the manifest's paths lie (default: ../shared/data)")
    ap.add_argument("--fold", type=int, default=0, help="the manifest fold (0: ACDC's held-out fold)")
    ap.add_argument("--cases", type=int, default=4, help="volumes compared (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    data_root = str(args.data_root or default_data_root())
    entries = select(load_manifest(args.manifest), folds=[args.fold])[: args.cases + 1]
    segmenter, ways = bundle_runs(args.device, "@ood_single_pass")
    scorer = ways["+ all scores"]
    precisions = ("float32", "bfloat16")
    results = {p: {"dice": [], "seconds": [], "scores": []} for p in precisions}
    agreement, flags_differ = [], 0
    for i, entry in enumerate(entries):
        image, truth = read_entry(entry, data_root)
        labels = {}
        for precision in precisions:
            segmenter.precision = precision
            labels[precision], scores, seconds = timed(segmenter, image, scorer)
            if i == 0:
                continue  # warm-up
            results[precision]["dice"].append(mean_dice(labels[precision], truth.array))
            results[precision]["seconds"].append(seconds)
            results[precision]["scores"].append(scores)
        if i:
            agreement.append(mean_dice(labels["bfloat16"], labels["float32"]))
            flags_differ += scorer.decide(results["float32"]["scores"][-1])[1] != scorer.decide(results["bfloat16"]["scores"][-1])[1]
    device = torch.cuda.get_device_name(segmenter.device) if segmenter.device.type == "cuda" else "CPU"
    print(f"\n{args.cases} volumes of {args.manifest} fold {args.fold} on {device}")
    for precision, r in results.items():
        print(f"{precision:9s} mean Dice {np.mean(r['dice']):.4f}, {np.mean(r['seconds']):.3f} s per volume")
    print(f"speed-up of bfloat16: x{np.mean(results['float32']['seconds']) / np.mean(results['bfloat16']['seconds']):.2f}; "
          f"Dice between the two label maps: mean {np.mean(agreement):.4f}, lowest {np.min(agreement):.4f}; "
          f"flags that differ ({scorer.default}): {flags_differ} of {args.cases}")
    print("largest change of each score, bfloat16 against float32, in standard deviations of its in-distribution "
          "validation scores (the spread its threshold was set in):")
    for name in results["float32"]["scores"][0]:
        spread = float(np.std([v for v in scorer.validation_scores.get(name, []) if np.isfinite(v)] or [np.nan]))
        change = max(abs(b[name] - f[name]) for f, b in zip(results["float32"]["scores"], results["bfloat16"]["scores"]))
        print(f"  {name:40s} {change / spread:.4f}")

if __name__ == "__main__":
    main()
