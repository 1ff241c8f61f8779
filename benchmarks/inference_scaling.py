"""How batch inference scales: time and peak memory against the number of volumes and the volume size.

Runs the bundle's inference (``run_batch``, the shipped model and the default OOD score unless told
otherwise) over synthetic short-axis stacks: first a growing number of volumes of one size (time should
grow linearly, memory not at all), then single volumes of growing in-plane size and slice count. Volumes
have 1.25 mm in-plane spacing, the preprocessing grid, so the in-plane size is the size the network sees.
Peak memory is the resident set (RSS) of the process during each run (the kernel's high-water mark,
reset before each run) and, on a GPU, the largest CUDA allocation. Prints a table and draws the plot.

    python benchmarks/inference_scaling.py                                   # CPU: a few minutes per setting
    python benchmarks/inference_scaling.py --device cuda --counts 10 30 100 300 --size_volumes 5
    python benchmarks/inference_scaling.py --model tiny --scores plain      # the pipeline around the network
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from inference_load import bundle_objects, write_inputs  # noqa: E402
from inference_speed import bundle_runs, timed_run  # noqa: E402

from cmr_ood.inference import DEFAULT_PREFETCH, DEFAULT_WORKERS  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood"
SCORES = {"plain": "plain segmentation", "default": "+ default score", "all": "+ all scores"}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib(resettable: bool) -> float:
    """The peak RSS since the last reset (or, where it cannot be reset, since the process started)."""
    if resettable:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(segmenter, scorer, manifest: Path, out: Path, prefetch: int) -> dict:
    """Seconds and peak memory of one run over a manifest (its outputs are removed afterwards)."""
    cuda = segmenter.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(segmenter.device)
    resettable = reset_peak_rss()
    seconds, records = timed_run(segmenter, scorer, manifest, None, out, prefetch, DEFAULT_WORKERS, segmenter.batch_slices, None)
    figures = {"volumes": len(records), "seconds": seconds, "seconds_per_volume": seconds / len(records),
               "peak_rss_mib": peak_rss_mib(resettable), "rss_peak_is_per_run": resettable}
    if cuda:
        figures["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated(segmenter.device) / 2**20
    return figures


def inputs(workdir: Path, name: str, count: int, shape, slice_mm: float) -> Path:
    return write_inputs(workdir / name, count, tuple(shape), (1.25, 1.25, slice_mm), None, seed=0)


def plot(counts: list[dict], sizes: list[dict], title: str, path: Path) -> None:
    """Time and peak memory against the number of volumes (left) and the network's voxels per volume (right)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    n = [r["volumes"] for r in counts]
    ax = axes[0, 0]
    ax.plot(n, [r["seconds"] for r in counts], "o-", label="measured")
    per_volume = sum(r["seconds"] for r in counts) / sum(n)
    ax.plot(n, [per_volume * k for k in n], "k--", lw=0.8, label=f"linear ({per_volume:.2f} s/volume)")
    ax.set(xlabel="volumes in the run", ylabel="wall time (s)", title=f"time vs number of volumes {counts[0]['shape']}",
           xlim=(0, None), ylim=(0, None))
    ax.legend()
    ax = axes[1, 0]
    ax.plot(n, [r["peak_rss_mib"] for r in counts], "o-", label="peak RSS")
    if "peak_cuda_allocated_mib" in counts[0]:
        ax.plot(n, [r["peak_cuda_allocated_mib"] for r in counts], "s-", label="peak CUDA allocated")
    ax.set(xlabel="volumes in the run", ylabel="MiB", title="peak memory vs number of volumes", xlim=(0, None), ylim=(0, None))
    ax.legend()
    for series, marker in (("in-plane", "o-"), ("slices", "s-")):
        rows = [r for r in sizes if r["series"] == series]
        mvox = [r["megavoxels"] for r in rows]
        axes[0, 1].plot(mvox, [r["seconds_per_volume"] for r in rows], marker, label=f"{series} sweep")
        axes[1, 1].plot(mvox, [r["peak_rss_mib"] for r in rows], marker, label=f"peak RSS, {series} sweep")
        if rows and "peak_cuda_allocated_mib" in rows[0]:
            axes[1, 1].plot(mvox, [r["peak_cuda_allocated_mib"] for r in rows], marker.replace("-", "--"),
                            label=f"peak CUDA allocated, {series} sweep")
        for r in rows:
            axes[0, 1].annotate("x".join(map(str, r["shape"])), (r["megavoxels"], r["seconds_per_volume"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
    axes[0, 1].set(xlabel="voxels per volume (millions)", ylabel="seconds per volume", title="time vs volume size",
                   xlim=(0, None), ylim=(0, None))
    axes[1, 1].set(xlabel="voxels per volume (millions)", ylabel="MiB", title="peak memory vs volume size",
                   xlim=(0, None), ylim=(0, None))
    for ax in axes[:, 1]:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("shipped", "tiny"), default="shipped", help="tiny: random weights, plain segmentation only")
    ap.add_argument("--scores", choices=tuple(SCORES), default="default", help="plain segmentation, the default score, or all scores")
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 30, 100], help="numbers of volumes of the first sweep")
    ap.add_argument("--count_shape", type=int, nargs=3, default=[128, 128, 8], help="the volumes' shape in the first sweep")
    ap.add_argument("--inplane", type=int, nargs="+", default=[128, 256, 384, 512], help="in-plane sizes (square) of the size sweep")
    ap.add_argument("--slices", type=int, nargs="+", default=[8, 12, 16, 20], help="slice counts of the size sweep")
    ap.add_argument("--fixed_inplane", type=int, default=256, help="in-plane size while the slice count varies")
    ap.add_argument("--fixed_slices", type=int, default=10, help="slice count while the in-plane size varies")
    ap.add_argument("--size_volumes", type=int, default=2, help="volumes per size (their mean is reported)")
    ap.add_argument("--slice_mm", type=float, default=10.0)
    ap.add_argument("--prefetch", type=int, default=DEFAULT_PREFETCH)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--png", default=str(BUNDLE / "docs" / "inference_scaling.png"))
    ap.add_argument("--json_out", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    if args.model == "tiny" and args.scores != "plain":
        ap.error("--model tiny has no fitted OOD state: use --scores plain")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="inference_scaling_"))
    try:
        if args.model == "tiny":
            segmenter, scorer = bundle_objects("tiny", args.device, False, workdir)
        else:
            segmenter, ways = bundle_runs(args.device)
            scorer = ways[SCORES[args.scores]]
        measure(segmenter, scorer, inputs(workdir, "warmup", 1, args.count_shape, args.slice_mm), workdir / "out", args.prefetch)
        counts, sizes = [], []
        for count in args.counts:
            row = measure(segmenter, scorer, inputs(workdir, f"n{count}", count, args.count_shape, args.slice_mm), workdir / "out",
                          args.prefetch)
            counts.append({**row, "shape": list(args.count_shape)})
            shutil.rmtree(workdir / f"n{count}")
            print(f"{count:5d} volumes {tuple(args.count_shape)}: {row['seconds']:8.1f} s, {row['seconds_per_volume']:.3f} s/volume, "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB" + (f", peak CUDA {row['peak_cuda_allocated_mib']:.0f} MiB" if
                                                              "peak_cuda_allocated_mib" in row else ""), flush=True)
        shapes = [("in-plane", (s, s, args.fixed_slices)) for s in args.inplane]
        shapes += [("slices", (args.fixed_inplane, args.fixed_inplane, z)) for z in args.slices]
        for series, shape in shapes:
            name = "x".join(map(str, shape))
            row = measure(segmenter, scorer, inputs(workdir, name, args.size_volumes, shape, args.slice_mm), workdir / "out", args.prefetch)
            sizes.append({**row, "series": series, "shape": list(shape), "megavoxels": shape[0] * shape[1] * shape[2] / 1e6})
            shutil.rmtree(workdir / name)
            print(f"{series:>8s} {name:>12s}: {row['seconds_per_volume']:8.2f} s/volume, peak RSS {row['peak_rss_mib']:.0f} MiB"
                  + (f", peak CUDA {row['peak_cuda_allocated_mib']:.0f} MiB" if "peak_cuda_allocated_mib" in row else ""), flush=True)
        cuda = segmenter.device.type == "cuda"
        device = torch.cuda.get_device_name(segmenter.device) if cuda else f"CPU (torch threads: {torch.get_num_threads()})"
        title = (f"run_batch scaling on {device}: {args.model} model, {SCORES[args.scores]}, prefetch {args.prefetch}; "
                 f"synthetic stacks, 1.25 mm in-plane" + ("" if counts[0]["rss_peak_is_per_run"] else "; RSS peak since start"))
        plot(counts, sizes, title, Path(args.png))
        print(f"plot: {args.png}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"title": title, "counts": counts, "sizes": sizes}, indent=1) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
