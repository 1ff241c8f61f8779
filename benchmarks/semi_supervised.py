"""Quality-aware semi-supervised learning (semiQCSeg): segmentation Dice with 5, 10 and 25 labelled ACDC subjects,
supervised only vs retrained on the labelled subjects plus pseudo-labelled unlabelled ones; prints a markdown table.

Every training run is the low-label study's (benchmarks/low_label_study.py: recipe ``configs/train_low_label.yaml``,
segmentation only, ``--data.low_label=seedS/N``), Dice measured once after the last epoch on the held-out fold 0.
Variants:
  supervised   the recipe on the labelled subset (round 0: the model that makes the first pseudo-labels)
  pseudo       plus every unlabelled training subject, pseudo-labelled by the previous round's model (gate none)
  qc           plus only the subjects whose pseudo-labelled ED/ES pair passes quality control
  qc+ood       plus only those that also pass the OOD gate: the bundle's default OOD score, fitted for each
               pseudo-labelling model on its labelled subjects alone (no held-out data; thresholds at 95% TPR
               on cases the model was trained on, so a strict gate)
A round pseudo-labels every unlabelled subject again with the previous round's model of the same variant and
retrains from scratch (``--rounds``, default 1).

    python benchmarks/semi_supervised.py                                  # on a GPU: the full grid
    python benchmarks/semi_supervised.py --sizes 5 --seeds 0 --variants supervised qc
    python benchmarks/semi_supervised.py --accelerator cpu --tiny --manifest M --data_root R   # a smoke run
Results are written after every run (``--out``), so an interrupted study resumes where it stopped; options it
does not know go to every training command line.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import yaml
from low_label_study import RECIPE, Results, study_arguments, train

from cmr_ood.data.manifests import load_manifest, select
from cmr_ood.training.pseudo_labels import bundle_segmenter, fit_gate_scorer, gate_scorer, pseudo_label

GATE_OF = {"pseudo": "none", "qc": "qc", "qc+ood": "qc+ood"}
VARIANTS = ("supervised", *GATE_OF)
EXPORT = "--trainer.callbacks+=cmr_ood.training.module.ExportNetwork"
TINY_NETWORK = {"channels": [4, 8, 16], "num_res_units": 1}
#: A smoke run's training: a tiny network for a few steps, validated at its one epoch.
TINY = ["--data.canvas=64", "--data.batch_size=8", "--data.steps_per_epoch=2", "--data.augment.patch_size=48",
        "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.precision=32-true",
        "--model.warmup_steps=1", "--model.channels_last=false",
        *(f"--model.network.init_args.{k}={json.dumps(v)}" for k, v in TINY_NETWORK.items())]


def markdown_table(results: dict, sizes, variants, rounds: int) -> str:
    """Mean Dice (mean +- sd over seeds, runs) and pseudo-labelled subjects kept, by variant and size."""
    lines = [f"mean Dice (LV, MYO, RV) on the held-out fold after {rounds} round(s); pseudo-labelled subjects kept of the pool",
             "", "| variant | " + " | ".join(f"{s} labelled" for s in sizes) + " | " + " | ".join(f"kept ({s})" for s in sizes) + " |",
             "|---" * (1 + 2 * len(sizes)) + "|"]
    for variant in variants:
        dice, kept = [], []
        for size in sizes:
            runs = [m for k, m in results.items() if k.startswith(f"{variant}/{size}/") and k.endswith(f"/round{final_round(variant, rounds)}")]
            values = [m["val/dice_mean"] for m in runs if "val/dice_mean" in m]
            dice.append(f"{np.mean(values):.3f} +- {np.std(values):.3f} ({len(values)})" if values else "-")
            counts = [(m["pseudo_labelled"], m["unlabelled_pool"]) for m in runs if "pseudo_labelled" in m]
            kept.append(f"{np.mean([c[0] for c in counts]):.1f} / {np.mean([c[1] for c in counts]):.0f}" if counts else "-")
        lines.append(f"| {variant} | " + " | ".join(dice) + " | " + " | ".join(kept) + " |")
    return "\n".join(lines)


def final_round(variant: str, rounds: int) -> int:
    return 0 if variant == "supervised" else rounds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study_arguments(parser, VARIANTS, "runs/semi_supervised")
    parser.add_argument("--rounds", type=int, default=1, help="pseudo-label and retrain this many times")
    parser.add_argument("--accelerator", default="gpu", help="trainer accelerator; pseudo-labelling runs on CUDA unless cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny network for a few steps: a smoke run of the loop")
    parser.add_argument("--manifest", default=None, help="default: the recipe's (data_manifests/acdc.json)")
    parser.add_argument("--data_root", default=None, help="default: $CMR_OOD_DATA or ../shared/data")
    args, extra = parser.parse_known_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    recipe = yaml.safe_load(RECIPE.read_text())
    manifest = args.manifest or recipe["data"]["manifest"]
    train_folds = recipe["data"]["train_folds"]
    network = recipe["model"]["network"]
    common = [f"--trainer.accelerator={args.accelerator}", *(TINY if args.tiny else []), *extra]
    if args.tiny:
        network = {**network, "init_args": {**network["init_args"], **TINY_NETWORK}}
    if args.data_root:
        common.append(f"--data.data_root={args.data_root}")
    device = "cpu" if args.accelerator == "cpu" or not torch.cuda.is_available() else "cuda"
    content = load_manifest(manifest)
    training_subjects = sorted({e["subject"] for e in select(content, folds=train_folds)})
    runs = Path(args.runs)
    results = Results(args.out or runs / "results.json")
    record = results.record

    def run(key: str, options: list[str], before=None) -> Path:
        """Train (unless done) and return the run's exported weights; ``before`` prepares the run (pseudo-labels)."""
        run_dir = runs / key.replace("/", "_").replace("+", "-")
        weights = run_dir / "model.pt"
        if key in results and weights.exists():
            return weights
        facts = before(run_dir) if before else {}
        metrics = train(run_dir, [*options, EXPORT, f"--trainer.callbacks.path={weights}"], [f"--data.manifest={manifest}", *common,
                                                                                            *facts.pop("options", [])])
        record(key, {**metrics, **facts})
        print(f"{key}: mean Dice {results[key].get('val/dice_mean', math.nan):.3f}", flush=True)
        return weights

    for size in args.sizes:
        for seed in args.seeds:
            subset = f"seed{seed}/{size}"
            labelled = content["low_label"][f"seed{seed}"][size]
            pool = [s for s in training_subjects if s not in set(labelled)]
            options = [f"--data.low_label={subset}", f"--seed_everything={seed}"]
            baseline = run(f"supervised/{size}/seed{seed}/round0", options)
            for variant in args.variants:
                if variant == "supervised":
                    continue
                gate, model = GATE_OF[variant], baseline
                for r in range(1, args.rounds + 1):
                    def prepare(run_dir: Path, model=model, gate=gate) -> dict:
                        scorer = None
                        if gate == "qc+ood":
                            scorer = gate_scorer()
                            fit_gate_scorer(bundle_segmenter(model, network, device), scorer, manifest, labelled,
                                            run_dir / "ood_gate" / "ood_state.pt", data_root=args.data_root)
                        log = pseudo_label(model, network, manifest, pool, run_dir / "pseudo", gate, scorer, labelled=labelled,
                                           train_folds=train_folds, data_root=args.data_root, device=device, overwrite=True)
                        return {"pseudo_labelled": len(log["kept"]), "unlabelled_pool": len(pool), "pseudo_label_seconds": log["seconds"],
                                "options": [f"--data.manifest={log['manifest']}"]}  # after the source manifest: it wins

                    model = run(f"{variant}/{size}/seed{seed}/round{r}", options, prepare)
    table = markdown_table(results, args.sizes, args.variants, args.rounds)
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
