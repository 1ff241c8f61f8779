"""Choose the default OOD score (the one behind ``ood_flag``) on the development split, never the test one.

Reads the cases that ``benchmarks/ood_benchmark.py --split calibration`` scored (the calibration half of
the held-out ACDC fold, those cases under the shift suite, and the far-OOD development images) and adds
candidate combinations of one output score and one feature or proxy score: the sum of their z-scores, the
feature score weighted 1, 1/2 or 1/4 and capped at z = 1, 2, 3 or not at all, or their maximum
(standardised with the validation scores stored in the OOD state, no network needed). The rule follows the
targets of the default score: among the scores that reach AUROC 0.99 on the far-OOD images, 0.90 for
in-distribution against the shifted cases of the highest severity, and rank silent failures (Dice < 0.8
over in-distribution and shifted cases) better than the foreground entropy and max-softmax baselines on
both AUROC and the area under the risk-coverage curve, on the cases as drawn and in 80% of subject-level
bootstrap resamples of them (a lead of a few thousandths is noise on 10 subjects), the one that best
detects the severe shifts. Prints the ranking.

    python benchmarks/choose_default.py --dev ood_dev
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser
from tqdm import tqdm

from cmr_ood.ood.metrics import aurc, detection_metrics, failure_auroc
from cmr_ood.qc.classifier import subject_of

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood"
BASELINES = ("entropy_fg", "msp_fg")
OUTPUT_SCORES = ("entropy_fg", "kl_uniform_fg", "energy_fg", "msp_fg", "soft_dice_gap")
OTHER_SCORES = ("mahalanobis_enc2", "mahalanobis_bottleneck", "spectral_bottleneck", "position_fg")
FEATURE_WEIGHTS = (1.0, 0.5, 0.25)
FEATURE_CAPS = (None, 1.0, 2.0, 3.0)
#: A candidate must beat the baselines on silent failures in this share of the subject-level bootstrap resamples
#: of the development cases, not only on the cases as drawn.
MIN_WIN_RATE = 0.8
BOOTSTRAP_RESAMPLES = 200


def by_kind(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The in-distribution, shifted and far-OOD cases."""
    return tuple([r for r in rows if r["kind"] == kind] for kind in ("id", "shift", "far"))


def beats_baselines(rows: list[dict], name: str) -> bool:
    """Whether score ``name`` ranks the failures of ``rows`` better than every baseline on AUROC and AURC."""
    dice = [r["dice"] for r in rows]
    figures = {n: (failure_auroc([r["scores"][n] for r in rows], dice), aurc([r["scores"][n] for r in rows], dice)["aurc"])
               for n in (name, *BASELINES)}
    return all(figures[name][0] > figures[b][0] and figures[name][1] < figures[b][1] for b in BASELINES)


def win_rate(rows: list[dict], name: str, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """Share of subject-level bootstrap resamples of ``rows`` (the cases with a Dice) on which ``name`` beats
    the baselines on silent failures: a lead that one or two subjects make does not survive resampling."""
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(subject_of(r), []).append(r)
    groups = list(by_subject.values())
    rng = np.random.default_rng(seed)
    wins = [beats_baselines([r for i in rng.integers(len(groups), size=len(groups)) for r in groups[i]], name)
            for _ in range(resamples)]
    return float(np.mean(wins))


def rank_scores(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Every score's figures on the scored development cases, and the scores that the rule accepts, best first."""
    ident, shifted, far = by_kind(rows)
    top_severity = max(r["severity"] for r in shifted)
    severe = [r for r in shifted if r["severity"] == top_severity]
    dice = [r["dice"] for r in ident + shifted]
    ranking = []
    for name in ident[0]["scores"]:
        values = lambda rs: [r["scores"][name] for r in rs]  # noqa: E731
        ranking.append({"score": name, "shift_auroc": detection_metrics(values(ident), values(severe))["auroc"],
                        "all_shifts_auroc": detection_metrics(values(ident), values(shifted))["auroc"],
                        "far_auroc": detection_metrics(values(ident), values(far))["auroc"] if far else math.nan,
                        "failure_auroc": failure_auroc(values(ident + shifted), dice),
                        "aurc": aurc(values(ident + shifted), dice)["aurc"], "win_rate": math.nan})
    candidates = [r for r in ranking if r["far_auroc"] >= 0.99 and r["shift_auroc"] >= 0.90 and r["score"] not in BASELINES
                  and beats_baselines(ident + shifted, r["score"])]
    for r in tqdm(candidates, desc="bootstrapping the candidates", unit="score"):
        r["win_rate"] = win_rate(ident + shifted, r["score"])
    eligible = sorted((r for r in candidates if r["win_rate"] >= MIN_WIN_RATE), key=lambda r: -r["shift_auroc"])
    return ranking, eligible


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
        for w, cap in itertools.product(FEATURE_WEIGHTS, FEATURE_CAPS):
            term = b if cap is None else f"min({b},{cap:g})"
            scorer.combinations.setdefault(f"{a}+{term}" if w == 1 else f"{a}+{w:g}*{term}",
                                           {"rule": "zsum", "scores": [a, b], "weights": [1.0, w], "clip": [None, cap]})
        scorer.combinations.setdefault(f"max({a},{b})", {"rule": "zmax", "scores": [a, b]})
    scorer.load(args.ood_state)  # fits the added combinations from the stored validation scores
    rows = [json.loads(line) for line in (Path(args.dev) / "scores.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "scores" in r]
    for r in rows:
        r["scores"].update(scorer.combine({k: (math.inf if v is None else v) for k, v in r["scores"].items()}))
    ranking, eligible = rank_scores(rows)
    ident, shifted, far = by_kind(rows)
    dice = [r["dice"] for r in ident + shifted]
    top_severity = max(r["severity"] for r in shifted)
    print(f"development split: {len(ident)} in-distribution, {len(shifted)} shifted ({sum(d < 0.8 for d in dice)} with Dice < 0.8), "
          f"{len(far)} far-OOD cases; {len(eligible)} of {len(ranking)} scores reach far-OOD AUROC 0.99, shifted AUROC 0.90 "
          f"at severity {top_severity} and beat {' and '.join(BASELINES)} on silent failures in {MIN_WIN_RATE:.0%} of "
          f"{BOOTSTRAP_RESAMPLES} subject-level bootstrap resamples")
    print(f"| score | failure AUROC | AURC | bootstrap win rate | shifted AUROC (severity {top_severity}) | shifted AUROC (all) | "
          "far-OOD AUROC |\n|---|---|---|---|---|---|---|")
    shown = eligible[: args.top]
    for r in shown + [r for r in ranking if r["score"] in (*BASELINES, scorer.default) and r not in shown]:
        print(f"| {r['score']} | {r['failure_auroc']:.3f} | {r['aurc']:.4f} | {r['win_rate']:.2f} | {r['shift_auroc']:.3f} | "
              f"{r['all_shifts_auroc']:.3f} | {r['far_auroc']:.3f} |")
    if eligible:
        print(f"best: {eligible[0]['score']}")


if __name__ == "__main__":
    main()
