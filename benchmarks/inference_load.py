"""Load test of batch inference: a thousand volumes or more through ``run_batch``, none lost.

Writes N volumes (synthetic short-axis stacks, or links to real volumes repeated over and over with
``--real``) and a manifest over them, then runs the bundle's inference (its network definition,
preprocessing, inferer, postprocessing, QC; OOD scoring with ``--score``) over the manifest. Prints the
throughput (volumes/s, slices/s), the peak resident memory (``getrusage``) and its growth over the run,
the peak CUDA memory on a GPU, and checks that every input has exactly one record in ``cases.json``.
The default network is a tiny one (random weights, seeded), so that the run ends in minutes on a CPU and
measures the pipeline around the network; ``--model shipped`` runs the bundle's trained model.

    python benchmarks/inference_load.py                                   # 1000 synthetic volumes, CPU
    python benchmarks/inference_load.py --real ../shared/data/acdc/training --volumes 2000
    python benchmarks/inference_load.py --model shipped --score --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from cmr_ood.data.manifests import discover
from cmr_ood.inference import CASES_FILE, run_batch
from cmr_ood.networks import CMRUNet

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood"
TINY = {"channels": [4, 8, 16], "num_res_units": 1}


def synthetic_stack(rng: np.random.Generator, shape) -> np.ndarray:
    """A cartoon short-axis stack (int16): bright LV disc in a dark myocardial ring, RV beside it, noise."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = rng.uniform(0.4, 0.6, 2) * shape[:2]
    radius = rng.uniform(0.08, 0.14) * min(shape[:2])
    image = np.full(shape, 80.0)
    for z in range(shape[2]):
        r = radius * (1 - 0.5 * z / max(1, shape[2] - 1))
        d = np.hypot(x - cx, y - cy)
        image[..., z][np.hypot(x - cx, y - (cy - 1.9 * r)) < 1.3 * r] = 280
        image[..., z][d < r + 2.5] = 60
        image[..., z][d < r] = 300
    return (image + rng.normal(0, 10, shape)).astype(np.int16)


def write_inputs(folder: Path, count: int, shape, spacing, real: str | None, seed: int) -> Path:
    """``count`` volumes under ``folder/data`` and a manifest over them; returns the manifest."""
    data = folder / "data"
    data.mkdir(parents=True)
    entries = []
    if real:
        sources = [Path(e["image"]) for e in discover(real) if "error" not in e and "dicom_files" not in e]
        if not sources:
            raise SystemExit(f"no NIfTI volumes found under {real}")
        for i in range(count):  # links: the same real volumes many times, each under its own name
            link = data / f"vol{i:05d}.nii.gz"
            os.symlink(sources[i % len(sources)].resolve(), link)
            entries.append({"image": link.name})
    else:
        rng = np.random.default_rng(seed)
        affine = np.diag([*spacing, 1.0])
        for i in range(count):
            nib.save(nib.Nifti1Image(synthetic_stack(rng, shape), affine), str(data / f"vol{i:05d}.nii.gz"))
            entries.append({"image": f"vol{i:05d}.nii.gz"})
    manifest = data / "manifest.json"
    manifest.write_text(json.dumps({"name": "load test", "training": entries}))
    return manifest


def bundle_objects(model: str, device: str, score: bool, workdir: Path, precision: str = "auto"):
    """The bundle's segmenter (and OOD scorer), with the tiny network's weights in place of the model's."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "device": f"$torch.device('{device}')", "precision": precision})
    if model == "tiny":
        torch.manual_seed(0)
        checkpoint = workdir / "tiny.pt"
        heads = parser.get("network_def#heads")
        torch.save(CMRUNet(heads=heads, **TINY).state_dict(), checkpoint)
        parser.update({"checkpoint": str(checkpoint), "network_def#channels": TINY["channels"],
                       "network_def#num_res_units": TINY["num_res_units"]})
    segmenter = parser.get_parsed_content("segmenter")
    return segmenter, parser.get_parsed_content("ood") if score else None


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=1000)
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 8], help="synthetic volumes' shape (x y z)")
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 8.0], help="synthetic volumes' spacing (mm)")
    ap.add_argument("--real", default=None, help="a folder of real NIfTI volumes to repeat instead of synthetic ones")
    ap.add_argument("--model", choices=("tiny", "shipped"), default="tiny")
    ap.add_argument("--score", action="store_true", help="score OOD too (the shipped model's fitted state)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder, removed)")
    ap.add_argument("--json_out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.score and args.model != "shipped":
        ap.error("--score needs --model shipped: only the shipped model has a fitted OOD state")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="inference_load_"))
    try:
        start = time.perf_counter()
        manifest = write_inputs(workdir, args.volumes, tuple(args.shape), tuple(args.spacing), args.real, seed=0)
        print(f"wrote {args.volumes} input volumes in {time.perf_counter() - start:.1f} s")
        segmenter, scorer = bundle_objects(args.model, args.device, args.score, workdir)
        if segmenter.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(segmenter.device)
        rss_before = current_rss_mib()
        start = time.perf_counter()
        records = run_batch(segmenter, workdir / "out", manifest=str(manifest), scorer=scorer)
        if segmenter.device.type == "cuda":
            torch.cuda.synchronize(segmenter.device)
        seconds = time.perf_counter() - start
        inputs = {str((manifest.parent / e["image"])) for e in json.loads(manifest.read_text())["training"]}
        written = json.loads((workdir / "out" / CASES_FILE).read_text())
        recorded = [r["image"] for r in written]
        lost = len(inputs - set(recorded))
        duplicated = len(recorded) - len(set(recorded))
        slices = sum(int(np.prod(r["shape"][2:])) for r in records if r["status"] == "ok")
        figures = {
            "volumes": args.volumes, "model": args.model, "scored": args.score, "device": str(segmenter.device),
            "threads": torch.get_num_threads(), "input": args.real or f"synthetic {tuple(args.shape)}",
            "seconds": round(seconds, 1), "volumes_per_s": round(args.volumes / seconds, 2), "slices_per_s": round(slices / seconds, 1),
            "ok": sum(r["status"] == "ok" for r in records), "errors": sum(r["status"] != "ok" for r in records),
            "lost": lost, "duplicated": duplicated,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_growth_over_run_mib": round(current_rss_mib() - rss_before, 1),
        }
        if segmenter.device.type == "cuda":
            figures["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(segmenter.device) / 2**20, 1)
            figures["peak_cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved(segmenter.device) / 2**20, 1)
        for key, value in figures.items():
            print(f"{key:>26}: {value}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(figures, indent=1) + "\n")
        assert lost == 0 and duplicated == 0 and len(written) == args.volumes, "inputs without exactly one record"
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
