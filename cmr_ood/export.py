"""Exports of the segmentation network (TorchScript, ONNX), the check that an export computes what the eager
network computes, and the model-zoo conformance checks of a bundle.

TorchScript goes through MONAI's ``ckpt_export`` (the model-zoo way: the bundle's metadata and config travel
inside the file); ONNX through torch's exporter, with a dynamic batch and a dynamic spatial size that is a
multiple of the network's divisor (16 for the shipped five-level U-Net; at least two such blocks, the smallest
size its instance norms accept at the bottleneck). Both hold ``forward``: the segmentation logits.

    python -m cmr_ood.export --bundle_root bundles/cmr_seg_ood --onnx /tmp/cmr_seg_ood.onnx --torchscript /tmp/model.ts --verify
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from torch import nn

from cmr_ood.networks import load_weights

# Largest |eager - export| accepted on the float32 logits (|logit| up to about 20). Exports reorder float32
# arithmetic (fused or reassociated convolutions and norms): on the shipped model they differ from eager by
# up to about 1e-4, as much as eager float32 differs from float64 itself; 5e-4 leaves room for other CPUs.
TOLERANCE = 5e-4
CHECK_SHAPES = ((1, 1, 128, 128), (3, 1, 96, 160))  # batch and spatial size other than the ONNX example's
INFERENCE_CONFIG = "configs/inference.json"
METADATA = "configs/metadata.json"
CHECKPOINT = "models/model.pt"


class ExportMismatchError(RuntimeError):
    """An exported model whose outputs differ from the eager network's by more than the tolerance."""


def load_bundle_network(bundle_root: str | os.PathLike, config_file: str = INFERENCE_CONFIG, ckpt_file: str = CHECKPOINT,
                        net_id: str = "network_def") -> nn.Module:
    """The bundle's network (``net_id`` of ``config_file``) with its weights, strictly loaded, in eval mode."""
    root = Path(bundle_root)
    parser = ConfigParser()
    parser.read_config(str(root / config_file))
    parser["bundle_root"] = str(root)
    return load_weights(parser.get_parsed_content(net_id), root / ckpt_file).eval()


def _writable(path: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    """The target and the temporary name an export is written to first (renamed once complete)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, path.with_name(f"{path.stem}.part{path.suffix or '.tmp'}")


def export_torchscript(bundle_root: str | os.PathLike, path: str | os.PathLike, *, config_file: str = INFERENCE_CONFIG,
                       ckpt_file: str = CHECKPOINT, meta_file: str = METADATA, net_id: str = "network_def",
                       overwrite: bool = False) -> Path:
    """The bundle's network scripted by MONAI's ``ckpt_export`` into ``path``, with the metadata and the config
    as extra files (read them back with ``monai.data.load_net_with_metadata``)."""
    root = Path(bundle_root)
    path, part = _writable(path, overwrite)
    try:
        ckpt_export(net_id=net_id, filepath=str(part), ckpt_file=str(root / ckpt_file), meta_file=str(root / meta_file),
                    config_file=str(root / config_file), bundle_root=str(root))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


def export_onnx(network: nn.Module, path: str | os.PathLike, *, example_shape: Sequence[int] = (2, 1, 128, 128),
                opset_version: int | None = None, dynamo: bool = True, overwrite: bool = False) -> Path:
    """``network.forward`` as an ONNX model (input ``image``, output ``pred``, the names of the bundle metadata),
    with a dynamic batch and dynamic height and width, each a multiple of ``network.divisor``.

    ``dynamo=True`` uses torch's ``torch.export``-based exporter, which also writes the multiple-of constraint
    into the model's symbolic sizes (``16*height_blocks``); ``dynamo=False`` the TorchScript-based one (deprecated
    by torch, about ten times faster). The example input needs a batch of 2 or more: torch.export fixes a
    dimension traced at size 1."""
    divisor = getattr(network, "divisor", 1)
    if example_shape[0] < 2 or any(s % divisor or s < 2 * divisor for s in example_shape[2:]):
        raise ValueError(f"example shape {tuple(example_shape)}: needs a batch >= 2 and spatial sizes that are multiples of "
                         f"{divisor}, at least {2 * divisor}")
    path, part = _writable(path, overwrite)
    network.eval()
    parameter = next(network.parameters())
    example = torch.rand(*example_shape, device=parameter.device, dtype=parameter.dtype)
    names = {"input_names": ["image"], "output_names": ["pred"], "opset_version": opset_version}
    if dynamo:
        # symbolic sizes height = divisor * blocks: every size the network accepts, and no other
        dim = torch.export.Dim
        spatial = {2 + i: divisor * dim(f"{name}_blocks", min=2) for i, name in enumerate(("height", "width"))}
        options = {"dynamic_shapes": ({0: dim("batch", min=1), **spatial},), "external_data": False}  # by position
    else:
        axes = {0: "batch", 2: "height", 3: "width"}
        options = {"dynamic_axes": {"image": axes, "pred": axes}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer sees the padding to a multiple of the divisor as a constant branch: it is one for the
            # inputs the exported model takes (other sizes fail at run time, they are not mis-segmented)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(network, (example,), str(part), dynamo=dynamo, **names, **options)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


def load_exported(path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running an exported model (``.onnx`` with onnxruntime, else TorchScript) on a batch, returning
    its first output as a tensor on the input's device."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported model there")
    if path.suffix == ".onnx":
        import onnxruntime

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in onnxruntime.get_available_providers()]
        session = onnxruntime.InferenceSession(str(path), providers=providers)
        name = session.get_inputs()[0].name

        def run_onnx(image: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: image.detach().cpu().numpy()})[0]).to(image.device)

        return run_onnx
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run_torchscript(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module.to(image.device)(image)

    return run_torchscript


def max_abs_difference(network: nn.Module, exported: str | os.PathLike | Callable[[torch.Tensor], torch.Tensor],
                       shape: Sequence[int] = (1, 1, 128, 128), seed: int = 0) -> float:
    """Largest |eager - export| over the outputs for one random input in [0, 1] (the input's value range)."""
    run = exported if callable(exported) else load_exported(exported)
    parameter = next(network.parameters())
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(*shape, generator=generator).to(device=parameter.device, dtype=parameter.dtype)
    network.eval()
    with torch.no_grad():
        expected = network(image)
    actual = run(image)
    if actual.shape != expected.shape:
        raise ExportMismatchError(f"output of shape {tuple(actual.shape)} for input {tuple(shape)}, eager gives {tuple(expected.shape)}")
    return float((actual.float() - expected.float()).abs().max())


def check_export(network: nn.Module, path: str | os.PathLike, shapes: Sequence[Sequence[int]] = CHECK_SHAPES,
                 tolerance: float = TOLERANCE) -> dict[str, float]:
    """Max |eager - export| per input shape (keys like ``1x1x128x128``); raises if one exceeds ``tolerance``."""
    run = load_exported(path)
    differences = {}
    for shape in shapes:
        try:
            differences["x".join(map(str, shape))] = max_abs_difference(network, run, shape)
        except ExportMismatchError as error:
            raise ExportMismatchError(f"{path}: {error}") from error
    worst = max(differences, key=differences.get)
    if differences[worst] > tolerance:
        raise ExportMismatchError(f"{path}: max |eager - export| = {differences[worst]:.3g} at input {worst}, above {tolerance:g}")
    return differences


def verify_bundle(bundle_root: str | os.PathLike, config_file: str = INFERENCE_CONFIG, meta_file: str = METADATA,
                  net_id: str = "network_def") -> None:
    """MONAI's model-zoo checks: the metadata against the schema it names (a path relative to the bundle root,
    so that no download is needed), and the network's channels and dtype against ``network_data_format``."""
    root = Path(bundle_root)
    schema = root / ConfigParser.load_config_file(root / meta_file)["schema"]
    if not schema.is_file():
        raise FileNotFoundError(f"{root / meta_file}: its schema {schema} does not exist")
    verify_metadata(meta_file=str(root / meta_file), filepath=str(schema))
    verify_net_in_out(net_id=net_id, meta_file=str(root / meta_file), config_file=str(root / config_file), device="cpu",
                      bundle_root=str(root))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.lower().replace("x", ",").split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmr_ood.export", description="Export a bundle's network and check the exports.")
    parser.add_argument("--bundle_root", default="bundles/cmr_seg_ood", help="bundle folder (configs/, models/)")
    parser.add_argument("--onnx", help="ONNX file to write")
    parser.add_argument("--onnx_exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="torch's ONNX exporter: torch.export-based (default) or the faster, deprecated TorchScript-based one")
    parser.add_argument("--torchscript", help="TorchScript file to write (MONAI ckpt_export)")
    parser.add_argument("--check", type=_shape, action="append", help="input shape to compare on, e.g. 1x1x128x128 (repeatable)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest |eager - export| accepted")
    parser.add_argument("--verify", action="store_true", help="also run MONAI's verify_metadata and verify_net_in_out")
    parser.add_argument("--overwrite", action="store_true", help="replace existing export files")
    args = parser.parse_args(argv)
    if not (args.onnx or args.torchscript or args.verify):
        parser.error("nothing to do: give --onnx, --torchscript and/or --verify")
    for target in (args.torchscript, args.onnx):
        if target and Path(target).exists() and not args.overwrite:
            parser.error(f"{target}: already exists (pass --overwrite to replace it)")
    network = load_bundle_network(args.bundle_root)
    exports = []
    if args.torchscript:
        exports.append(export_torchscript(args.bundle_root, args.torchscript, overwrite=args.overwrite))
    if args.onnx:
        exports.append(export_onnx(network, args.onnx, dynamo=args.onnx_exporter == "dynamo", overwrite=args.overwrite))
    failed = False
    for path in exports:
        try:
            differences = check_export(network, path, args.check or CHECK_SHAPES, args.tolerance)
            print(f"{path}: " + ", ".join(f"input {shape}: max |eager - export| {d:.2e}" for shape, d in differences.items()))
        except ExportMismatchError as error:
            print(error, file=sys.stderr)
            failed = True
    if args.verify:
        verify_bundle(args.bundle_root)
        print(f"{args.bundle_root}: metadata and network input/output verified")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
