"""Low-label study: segmentation Dice with 5, 10 and 25 labelled ACDC subjects (the other training subjects
unlabelled), from scratch, after self-supervised pretraining, and multi-task; prints the table.

Every run is the training command line with the recipe ``configs/train_low_label.yaml`` and the subsets and
seeds of ``data_manifests/acdc.json``; Dice is measured once, after the last epoch, on the held-out fold 0
(3D per volume, on the preprocessed slices). Variants:
  scratch        segmentation only, on the labelled subset
  multitask      segmentation + masked image modelling + slice position; the proxy tasks also see the
                 unlabelled subjects (half of each batch)
  mim, position  pretraining on every training slice (no labels, seed 0) with that proxy task, then
                 fine-tuning all weights on the labelled subset
  simclr, pcl,   the same with contrastive pretraining of the encoder (SimCLR, positional contrastive
  dino           learning, DINO; two augmented views of each slice), the task and its options taken from
                 configs/pretrain_<name>.yaml; the decoder starts fine-tuning afresh

    python benchmarks/low_label_study.py --jobs 4            # on a GPU: the full grid
    python benchmarks/low_label_study.py --sizes 5 --seeds 0 --variants scratch
Results are written after every run (``--out``), so an interrupted study keeps what it finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood" / "configs"
RECIPE = CONFIGS / "train_low_label.yaml"
MULTITASK = json.dumps(yaml.safe_load((CONFIGS / "train.yaml").read_text())["model"]["tasks"])  # the shipped recipe's loss weights
CONTRASTIVE = {name: yaml.safe_load((CONFIGS / f"pretrain_{name}.yaml").read_text())["model"]
               for name in ("simclr", "pcl", "dino")}
# pretraining variants: the --model options of the proxy task (all on the low-label recipe's schedule)
PRETRAINED = {
    "mim": ["--model.tasks={mim: 1.0}"],
    "position": ["--model.tasks={position: 1.0}"],
    **{name: [f"--model.tasks={json.dumps(model['tasks'])}",
              f"--model.task_options={json.dumps(model.get('task_options') or {})}"] for name, model in CONTRASTIVE.items()},
}
VARIANTS = ("scratch", "multitask", *PRETRAINED)


def train(run_dir: Path, options: list[str], extra: list[str]) -> dict:
    """One training run; returns the last logged metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cmr_ood.train", "fit", f"--config={RECIPE}", "--trainer.enable_progress_bar=false",
               "--trainer.enable_checkpointing=false", "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
               f"--trainer.logger.save_dir={run_dir}", "--trainer.logger.version=0", f"--trainer.default_root_dir={run_dir}",
               *options, *extra]
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        raise RuntimeError(f"run failed ({run_dir / 'train.log'}): " + " ".join(command))
    last: dict = {}
    with open(run_dir / "lightning_logs" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    last["seconds"] = round(time.perf_counter() - start, 1)
    return last


def study_arguments(parser: argparse.ArgumentParser, variants, runs: str) -> None:
    """The options every low-label study shares: the grid (sizes, seeds, variants) and where its runs go."""
    parser.add_argument("--sizes", nargs="+", default=["5", "10", "25"])
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=variants)
    parser.add_argument("--runs", default=runs, help="folder of the runs' logs and weights")
    parser.add_argument("--out", default=None, help="results JSON (default: RUNS/results.json)")


class Results(dict):
    """A study's results by run, rewritten after every run so that a stopped study resumes where it stopped."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(json.loads(self.path.read_text()) if self.path.exists() else {})

    def record(self, key: str, metrics: dict) -> None:
        self[key] = metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study_arguments(parser, VARIANTS, "runs/low_label")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side on the one device")
    args, extra = parser.parse_known_args()  # anything else goes to every training command line
    runs = Path(args.runs)
    results = Results(args.out or runs / "results.json")
    record = results.record

    def pretrain(name: str) -> Path:
        weights = runs / f"pretrain_{name}" / "model.pt"
        if not weights.exists():
            options = [*PRETRAINED[name], "--trainer.callbacks+=cmr_ood.training.module.ExportNetwork",
                       f"--trainer.callbacks.path={weights}"]
            record(f"pretrain_{name}", train(weights.parent, options, extra))
        return weights

    with ThreadPoolExecutor(args.jobs) as pool:
        pretrained = {name: pool.submit(pretrain, name) for name in args.variants if name in PRETRAINED}
        pending = []
        for size in args.sizes:
            for variant in args.variants:
                for seed in args.seeds:
                    key = f"{variant}/{size}/seed{seed}"
                    if key in results:
                        continue
                    options = [f"--data.low_label=seed{seed}/{size}", f"--seed_everything={seed}"]
                    if variant == "multitask":
                        options += ["--data.unlabelled=true", f"--model.tasks={MULTITASK}"]

                    def job(key=key, options=options, variant=variant):
                        if variant in pretrained:
                            options = [*options, f"--model.init_weights={pretrained[variant].result()}"]
                        record(key, train(runs / key.replace("/", "_"), options, extra))
                        print(f"{key}: mean Dice {results[key].get('val/dice_mean', float('nan')):.3f}", flush=True)

                    pending.append(pool.submit(job))
        for future in pending:
            future.result()
    print_table(results, args.sizes, args.variants)


def print_table(results: dict, sizes, variants) -> None:
    print("\nmean Dice (LV, MYO, RV) on held-out ACDC fold 0, mean +- sd over seeds (n runs)")
    print(f"{'variant':<12}" + "".join(f"{size + ' subjects':>22}" for size in sizes))
    for variant in variants:
        cells = []
        for size in sizes:
            values = [m["val/dice_mean"] for k, m in results.items() if k.startswith(f"{variant}/{size}/") and "val/dice_mean" in m]
            cells.append(f"{np.mean(values):.3f} +- {np.std(values):.3f} ({len(values)})" if values else "-")
        print(f"{variant:<12}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
