"""Cost of OOD scoring as a ratio to plain segmentation, on the same cases in one run.

Four ways over the same volumes, each timed over every case after one warm-up case: plain segmentation
(``Segmenter.segment``); segmentation with the default score only; with every single-pass score (what
the bundle computes by default); with the multi-pass scores too (``--all_detectors``). Then each
detector's own cost per volume, on the outputs of one shared network pass (the probabilities and the
predicted heart, which all output scores share, computed beforehand; a product of maps counts its parts).
Needs the bundle's fitted OOD state (``configs/calibrate.json``).

    python benchmarks/ood_speed.py --data_root ../shared/data --cases 6
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from cmr_ood.data.manifests import default_data_root, load_manifest, ood_split, read_entry, select

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood"


def scorer_from_bundle(parser: ConfigParser, detectors: str):
    parser["ood_detectors"] = detectors
    parser.parse(True)
    return parser.get_parsed_content("ood", instantiate=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="data_manifests/acdc.json")
    ap.add_argument("--data_root", default=None)
    ap.add_argument("--cases", type=int, default=6, help="test-half volumes of the manifest's ood_split")
    ap.add_argument("--ood_state", default=str(BUNDLE / "models" / "ood_state.pt"))
    ap.add_argument("--all_detectors", default="$@ood_single_pass + @ood_sampling[:1]",
                    help="the bundle expression for 'all scores' (the shipped state adds the masked reconstruction "
                         "error; MC dropout and TTA need a state calibrated with them: '$@ood_single_pass + @ood_sampling')")
    args = ap.parse_args(argv)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "ood_state": args.ood_state})
    segmenter = parser.get_parsed_content("segmenter")
    every = scorer_from_bundle(parser, args.all_detectors)
    single = every.restricted([n for d in every.detectors if d in parser.get_parsed_content("ood_single_pass") for n in d.score_names]
                              + list(every.combinations))
    default = every.restricted([every.default])
    content = load_manifest(args.manifest)
    entries = select(content, subjects=ood_split(content, "test"))[: args.cases + 1]
    volumes = [read_entry(e, args.data_root or default_data_root(), labels=False)[0] for e in entries]
    runs = {"plain segmentation": lambda v: segmenter.segment(v)}
    for label, scorer in (("+ default score", default), ("+ single-pass scores", single), ("+ all scores", every)):
        runs[label] = lambda v, s=scorer: segmenter.segment_and_score(v, s)
    times = {label: seconds_per_volume(fn, volumes, segmenter.device) for label, fn in runs.items()}
    device = torch.cuda.get_device_name() if segmenter.device.type == "cuda" else "CPU"
    print(f"{len(volumes) - 1} ACDC volumes on {device}; default score '{every.default}' "
          f"({', '.join(d.name for d in default.detectors)})")
    for label, t in times.items():
        print(f"  {label:24s} {t * 1000:8.0f} ms per volume  x{t / times['plain segmentation']:.2f}")
    print("each detector on the outputs of one network pass (ms per volume, x plain segmentation):")
    for name, t in detector_costs(segmenter, every, volumes).items():
        print(f"  {name:24s} {t * 1000:8.0f} ms per volume  x{t / times['plain segmentation']:.2f}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_volume(fn, volumes, device: torch.device) -> float:
    """Mean seconds of ``fn`` per volume over ``volumes[1:]``, after ``volumes[0]`` as a warm-up."""
    fn(volumes[0])
    synchronize(device)
    start = time.perf_counter()
    for v in volumes[1:]:
        fn(v)
    synchronize(device)
    return (time.perf_counter() - start) / (len(volumes) - 1)


def detector_costs(segmenter, scorer, volumes) -> dict[str, float]:
    """Each detector's seconds per volume (mean over ``volumes[1:]``; the first warms up) on the outputs of
    one shared network pass with every tap, its voxel maps recomputed for each detector."""
    totals = dict.fromkeys((d.name for d in scorer.detectors), 0.0)
    for i, volume in enumerate(volumes):
        case, _ = segmenter.outputs(volume, taps=scorer.taps)
        case.temperature = scorer.temperature.temperature
        _ = case.probabilities, case.foreground  # shared by the output scores: not any one detector's cost
        for detector in scorer.detectors:
            case._maps.clear()
            synchronize(segmenter.device)
            start = time.perf_counter()
            detector.case_scores(case)
            synchronize(segmenter.device)
            if i:
                totals[detector.name] += time.perf_counter() - start
    return {name: t / (len(volumes) - 1) for name, t in totals.items()}


if __name__ == "__main__":
    main()
