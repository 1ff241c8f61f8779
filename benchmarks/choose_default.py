"""Choose the default OOD score (the one behind ``ood_flag``) on the development split, never the test one.

Reads the cases that ``benchmarks/ood_benchmark.py --split calibration`` scored (the calibration half of
the held-out ACDC fold, those cases under the shift suite, and the far-OOD development images), adds
candidate combinations (the sum or the maximum of the z-scores of one output score and one feature or proxy score, fitted from the
validation scores stored in the OOD state, no network needed), and ranks every score by the mean of two
AUROCs: in-distribution against all shifted cases, and silent failures (Dice < 0.8) over in-distribution
and shifted cases; a candidate must reach AUROC 0.99 on the far-OOD images. Prints the ranking.

    python benchmarks/choose_default.py --dev ood_dev
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

from monai.bundle import ConfigParser

from cmr_ood.ood.metrics import aurc, detection_metrics, failure_auroc

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood"
OUTPUT_SCORES = ("entropy_fg", "kl_uniform_fg", "energy_fg", "msp_fg")
OTHER_SCORES = ("mahalanobis_enc2", "mahalanobis_bottleneck", "spectral_bottleneck", "position_fg")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", required=True, help="output folder of ood_benchmark.py --split calibration")
    ap.add_argument("--ood_state", default=str(BUNDLE / "models" / "ood_state.pt"))
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "ood_state": args.ood_state})
    scorer = parser.get_parsed_content("ood")
    for a, b in itertools.product(OUTPUT_SCORES, OTHER_SCORES):
        scorer.combinations.setdefault(f"{a}+{b}", {"rule": "zsum", "scores": [a, b]})
        scorer.combinations.setdefault(f"max({a},{b})", {"rule": "zmax", "scores": [a, b]})
    scorer.load(args.ood_state)  # fits the added combinations from the stored validation scores
    rows = [json.loads(line) for line in (Path(args.dev) / "scores.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "scores" in r]
    for r in rows:
        r["scores"].update(scorer.combine({k: (math.inf if v is None else v) for k, v in r["scores"].items()}))
    ident = [r for r in rows if r["kind"] == "id"]
    shifted = [r for r in rows if r["kind"] == "shift"]
    far = [r for r in rows if r["kind"] == "far"]
    dice = [r["dice"] for r in ident + shifted]
    ranking = []
    for name in ident[0]["scores"]:
        values = lambda rs: [r["scores"][name] for r in rs]  # noqa: E731
        shift_auroc = detection_metrics(values(ident), values(shifted))["auroc"]
        far_auroc = detection_metrics(values(ident), values(far))["auroc"] if far else math.nan
        fail = failure_auroc(values(ident + shifted), dice)
        ranking.append({"score": name, "rank_value": (shift_auroc + fail) / 2, "shift_auroc": shift_auroc, "far_auroc": far_auroc,
                        "failure_auroc": fail, "aurc": aurc(values(ident + shifted), dice)["aurc"]})
    eligible = sorted((r for r in ranking if r["far_auroc"] >= 0.99), key=lambda r: -r["rank_value"])
    print(f"development split: {len(ident)} in-distribution, {len(shifted)} shifted ({sum(d < 0.8 for d in dice)} with Dice < 0.8), "
          f"{len(far)} far-OOD cases; {len(eligible)} of {len(ranking)} scores reach far-OOD AUROC 0.99")
    print("| score | mean | shifted AUROC | failure AUROC | AURC | far-OOD AUROC |\n|---|---|---|---|---|---|")
    baseline = next(r for r in ranking if r["score"] == "entropy_fg")
    for r in eligible[: args.top] + ([baseline] if baseline not in eligible[: args.top] else []):
        print(f"| {r['score']} | {r['rank_value']:.3f} | {r['shift_auroc']:.3f} | {r['failure_auroc']:.3f} | {r['aurc']:.4f} | "
              f"{r['far_auroc']:.3f} |")
    if eligible:
        print(f"best: {eligible[0]['score']}")


if __name__ == "__main__":
    main()
