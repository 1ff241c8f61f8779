"""Where the time of batch inference goes, stage by stage, and what overlapping and batching gain.

Runs the bundle's whole inference path (``run_batch``: read, preprocess, network, inversion and
postprocessing, OOD scoring, QC and measurements, writing) over the same volumes three ways, side by side
in one run: plain segmentation, the default score only (``scorer.default`` and the detectors it needs), and
all scores (the single-pass ones plus the reconstruction error); ``--model tiny``: a tiny random network,
plain segmentation only, to see the pipeline around the network. Each way runs, after one warm-up case:
sequentially (``prefetch=0, workers=0``, one case a network call), overlapped (``--prefetch`` cases read
ahead, ``--workers`` threads finishing cases: connected components, QC, writing) and batched (also up to
``--batch_slices`` slices of several cases a network call: the bundle's default path). ``--repeats``
interleaves several runs of each and keeps the fastest. Prints volumes/s, the seconds per volume of each
stage of the sequential loop (the records' ``seconds``; on a GPU from an extra run that waits for the
device at each stage boundary) and the cost of scoring as a ratio to plain segmentation, run by run.
Needs the shipped model and its fitted OOD state (not for ``--model tiny``).

    python benchmarks/inference_speed.py --data_root ../shared/data --cases 6       # ACDC held-out fold 0
    python benchmarks/inference_speed.py --synthetic --cases 6
    python benchmarks/inference_speed.py --synthetic --model tiny --cases 40    # where the work around the network weighs
    python benchmarks/inference_speed.py --data_root ../shared/data --cases 40 --device cuda --json_out speed.json
    python benchmarks/inference_speed.py --data_root ../shared/data --cases 40 --device cuda --precision float32   # side by side
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from inference_load import bundle_objects, write_inputs
from monai.bundle import ConfigParser
from ood_speed import scorer_from_bundle

from cmr_ood.data.manifests import default_data_root, load_manifest, select
from cmr_ood.inference import DEFAULT_PREFETCH, DEFAULT_WORKERS, PRECISIONS, run_batch
from cmr_ood.timing import STAGES

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood"
ALL_SCORES = "$@ood_single_pass + @ood_sampling[:1]"


def bundle_runs(device: str, all_detectors: str = ALL_SCORES, ood_state: str | None = None, precision: str = "auto",
                test_time_views: int | None = None):
    """The bundle's segmenter and the three ways to run it: name -> OOD scorer (None: plain segmentation);
    ``test_time_views`` instead of the bundle's default for the device."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "device": f"$torch.device('{device}')", "precision": precision})
    if ood_state:
        parser["ood_state"] = ood_state
    if test_time_views is not None:
        parser["test_time_views"] = test_time_views
    segmenter = parser.get_parsed_content("segmenter")
    every = scorer_from_bundle(parser, all_detectors)
    return segmenter, {"plain segmentation": None, "+ default score": every.restricted([every.default]), "+ all scores": every}


def acdc_inputs(folder: Path, manifest: str, data_root: str, fold: int, count: int) -> tuple[Path, Path]:
    """Manifests of one warm-up volume and of ``count`` volumes of one fold (paths stay relative to ``data_root``)."""
    entries = select(load_manifest(manifest), folds=[fold])
    if len(entries) < count + 1:
        raise SystemExit(f"fold {fold} of {manifest} has {len(entries)} volumes: fewer than --cases {count} + 1 warm-up")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("warmup", entries[:1]), ("cases", entries[1: count + 1])):
        paths.append(folder / f"{name}.json")
        paths[-1].write_text(json.dumps({"name": f"speed benchmark {name}", "training": part}))
    return paths[0], paths[1]


def synthetic_inputs(folder: Path, count: int, shape, spacing) -> tuple[Path, Path]:
    warmup = write_inputs(folder / "warmup", 1, shape, spacing, None, seed=1)
    return warmup, write_inputs(folder / "cases", count, shape, spacing, None, seed=0)


def timed_run(segmenter, scorer, manifest: Path, data_root, out: Path, prefetch: int, workers: int, batch_slices: int,
              timing: str) -> tuple[float, list[dict]]:
    """Wall seconds of one ``run_batch`` and its records; its outputs are removed afterwards."""
    segmenter.batch_slices = batch_slices
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)
    start = time.perf_counter()
    records = run_batch(segmenter, out, manifest=str(manifest), data_root=data_root, scorer=scorer, prefetch=prefetch, workers=workers,
                        timing=timing)
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} cases failed, e.g. {failed[0]['image']}: {failed[0]['error']}")
    return seconds, records


def stage_means(records: list[dict]) -> dict[str, float]:
    """Mean seconds per volume of every stage over the records."""
    return {s: sum(r["seconds"].get(s, 0.0) for r in records) / len(records) for s in STAGES}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="data_manifests/acdc.json")
    ap.add_argument("--data_root", default=None, help="where the manifest's paths lie (default: ../shared/data)")
    ap.add_argument("--fold", type=int, default=0, help="the manifest fold to take volumes from (0: ACDC's held-out fold)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic stacks instead of the manifest's volumes")
    ap.add_argument("--shape", type=int, nargs=3, default=[224, 224, 10], help="synthetic volumes' shape (x y z)")
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 10.0], help="synthetic volumes' spacing (mm)")
    ap.add_argument("--cases", type=int, default=6, help="volumes timed (after one more for warm-up)")
    ap.add_argument("--model", choices=("shipped", "tiny"), default="shipped", help="tiny: random weights, plain segmentation only")
    ap.add_argument("--prefetch", type=int, default=DEFAULT_PREFETCH, help="cases read ahead of the network")
    ap.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="threads finishing cases beside the network")
    ap.add_argument("--batch_slices", type=int, default=None,
                    help="slices of several cases a network call in the batched run (default: the bundle's)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each kind, interleaved, keeping the fastest (a shared machine's load changes during a run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--all_detectors", default=ALL_SCORES, help="the bundle expression for 'all scores'")
    ap.add_argument("--ood_state", default=None, help="a fitted OOD state other than the shipped one")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="the network's precision (default: the bundle's)")
    ap.add_argument("--test_time_views", type=int, default=None, help="views of each slice (default: the bundle's for the device)")
    ap.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder, removed)")
    ap.add_argument("--json_out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="inference_speed_"))
    try:
        if args.synthetic:
            warmup, manifest = synthetic_inputs(workdir / "inputs", args.cases, tuple(args.shape), tuple(args.spacing))
            data_root, source = None, f"synthetic {tuple(args.shape)} at {tuple(args.spacing)} mm"
        else:
            data_root = str(args.data_root or default_data_root())
            warmup, manifest = acdc_inputs(workdir / "inputs", args.manifest, data_root, args.fold, args.cases)
            source = f"{args.manifest} fold {args.fold}"
        if args.model == "tiny":
            segmenter, ways = bundle_objects("tiny", args.device, False, workdir, args.precision)[0], {"plain segmentation": None}
        else:
            segmenter, ways = bundle_runs(args.device, args.all_detectors, args.ood_state, args.precision, args.test_time_views)
        cuda = segmenter.device.type == "cuda"
        args.batch_slices = args.batch_slices or segmenter.batch_slices
        results = {}
        runs = {"sequential": (0, 0, 1, "wall"), "overlapped": (args.prefetch, args.workers, 1, "wall"),
                "batched": (args.prefetch, args.workers, args.batch_slices, "wall")}
        if cuda:  # the stage split needs the device's clock: one more run, waiting for it at every boundary
            runs["stages"] = (0, 0, 1, "sync")
        for name, scorer in ways.items():
            timed_run(segmenter, scorer, warmup, data_root, workdir / "out", 0, 0, 1, None)
            tries = {k: [] for k in runs}
            for _ in range(args.repeats):  # interleaved, so that a change of load hits each kind alike
                for k, v in runs.items():
                    tries[k].append(timed_run(segmenter, scorer, manifest, data_root, workdir / "out", *v))
            timed = {k: min(t, key=lambda run: run[0]) for k, t in tries.items()}
            seconds = {k: t / args.cases for k, (t, _) in timed.items() if k != "stages"}
            results[name] = {"seconds_per_volume": seconds, "volumes_per_s": {k: 1 / v for k, v in seconds.items()},
                             "stages": stage_means(timed["stages" if cuda else "sequential"][1])}
        plain = results["plain segmentation"]["seconds_per_volume"]
        for r in results.values():
            r["ratio_to_plain"] = {k: v / plain[k] for k, v in r["seconds_per_volume"].items()}
        device = torch.cuda.get_device_name(segmenter.device) if cuda else f"CPU (torch threads: {torch.get_num_threads()})"
        default = f"default score '{ways['+ all scores'].default}'" if "+ all scores" in ways else "tiny network"
        print(f"\n{args.cases} volumes ({source}) on {device}, network in {segmenter.network_precision}, {segmenter.views} view(s); {default}")
        print(f"the sequential loop (one case at a time, every step in one thread), seconds per volume by stage "
              f"{'synchronised with the device' if cuda else 'by the host clock'}:")
        print(f"{'':22s} {'vol/s':>6s} {'s/vol':>7s} {'x plain':>7s} " + " ".join(f"{s:>11s}" for s in STAGES) + f" {'other':>7s}")
        for name, r in results.items():
            sequential = r["seconds_per_volume"]["sequential"]
            other = sequential - sum(r["stages"].values())
            print(f"{name:22s} {1 / sequential:6.2f} {sequential:7.3f} {r['ratio_to_plain']['sequential']:7.2f} "
                  + " ".join(f"{r['stages'][s]:11.4f}" for s in STAGES) + f" {other:7.3f}")
        print(f"\nvolumes/s (x plain segmentation) of the sequential loop; overlapped: {args.prefetch} cases read ahead and "
              f"{args.workers} workers finishing cases; batched: also up to {args.batch_slices} slices of several cases a network call")
        print(f"{'':22s} " + " ".join(f"{k:>18s}" for k in runs if k != "stages"))
        for name, r in results.items():
            print(f"{name:22s} " + " ".join(f"{r['volumes_per_s'][k]:8.2f} (x{r['ratio_to_plain'][k]:5.2f})" for k in runs if k != "stages"))
        if args.json_out:
            figures = {"device": device, "input": source, "cases": args.cases, "prefetch": args.prefetch, "workers": args.workers,
                       "batch_slices": args.batch_slices, "precision": segmenter.network_precision, "views": segmenter.views,
                       "repeats": args.repeats, "results": results}
            Path(args.json_out).write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
