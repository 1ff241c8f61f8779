import json
import re

import onnx
import pytest
import torch
from helpers import BUNDLE
from monai.bundle import verify_metadata, verify_net_in_out
from monai.data import load_net_with_metadata

from cmr_ood.export import (
    TOLERANCE,
    ExportMismatchError,
    check_export,
    export_onnx,
    export_torchscript,
    load_bundle_network,
    main,
    max_abs_difference,
    verify_bundle,
)
from cmr_ood.networks import CMRUNet

CONFIGS = BUNDLE / "configs"
SHAPES = ((1, 1, 128, 128), (2, 1, 64, 96))  # batch sizes and a non-square size other than the ONNX example's


@pytest.fixture(scope="module")
def network():
    return load_bundle_network(BUNDLE)


@pytest.fixture(scope="module")
def metadata():
    return json.loads((CONFIGS / "metadata.json").read_text())


def _small_network():
    torch.manual_seed(0)
    return CMRUNet(channels=(4, 8, 16), num_res_units=1, heads={"mim": 1}).eval()  # divisor 4


def _onnx_sizes(path):
    """Each graph input's and output's dimensions: symbolic names or fixed sizes."""
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}


def test_torchscript_from_ckpt_export_matches_eager_and_carries_the_bundle(network, metadata, tmp_path):
    path = export_torchscript(BUNDLE, tmp_path / "model.ts")
    assert not list(tmp_path.glob("*.part*"))
    differences = check_export(network, path, SHAPES)
    assert set(differences) == {"1x1x128x128", "2x1x64x96"} and max(differences.values()) <= TOLERANCE
    _, meta, extra = load_net_with_metadata(str(path), more_extra_files=("inference.json",))
    assert meta["version"] == metadata["version"] and "network_def" in json.loads(extra["inference.json"])
    with pytest.raises(FileExistsError, match="model.ts"):  # an existing file is not replaced unasked
        export_torchscript(BUNDLE, path)


def test_onnx_command_on_the_shipped_model_matches_eager_for_any_batch_and_size(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    checks = [a for shape in SHAPES for a in ("--check", "x".join(map(str, shape)))]
    assert main(["--bundle_root", str(BUNDLE), "--onnx", str(path), "--onnx_exporter", "torchscript", *checks]) == 0
    assert _onnx_sizes(path) == {"image": ["batch", 1, "height", "width"], "pred": ["batch", 4, "height", "width"]}
    reported = dict(re.findall(r"input (\S+): max \|eager - export\| ([0-9.e+-]+)", capsys.readouterr().out))
    assert set(reported) == {"1x1x128x128", "2x1x64x96"} and max(map(float, reported.values())) <= TOLERANCE


@pytest.mark.slow  # torch.export costs 10-15 s of CPU whatever the network's size
def test_onnx_default_exporter_keeps_sizes_multiples_of_the_divisor(tmp_path):
    small = _small_network()
    path = export_onnx(small, tmp_path / "small.onnx", example_shape=(2, 1, 16, 24))
    sizes = _onnx_sizes(path)
    assert sizes["image"][:2] == ["batch", 1] and sizes["pred"][:2] == ["batch", 4]
    assert sizes["image"][2:] == sizes["pred"][2:] == ["4*height_blocks", "4*width_blocks"]
    assert max(check_export(small, path, ((1, 1, 8, 8), (3, 1, 32, 20))).values()) <= TOLERANCE
    with pytest.raises(ValueError, match="multiples of 4"):
        export_onnx(small, tmp_path / "other.onnx", example_shape=(2, 1, 18, 24))


def test_check_export_reports_an_export_that_differs(tmp_path):
    small = _small_network()
    path = export_onnx(small, tmp_path / "small.onnx", example_shape=(2, 1, 16, 16), dynamo=False)
    assert max_abs_difference(small, path, (1, 1, 16, 16)) < 1e-5
    with torch.no_grad():
        small.heads["seg"].bias.add_(1e-2)  # the eager network moves on, the export does not
    assert max_abs_difference(small, path, (1, 1, 16, 16)) == pytest.approx(1e-2, rel=1e-2)
    with pytest.raises(ExportMismatchError, match="small.onnx"):
        check_export(small, path, ((1, 1, 16, 16),))


def test_bundle_passes_verify_metadata_and_verify_net_in_out(network, metadata):
    verify_bundle(BUNDLE)  # raises on any failure
    image = torch.rand(2, 1, 64, 48)
    with torch.no_grad():  # what the exports hold: forward is the segmentation head, described as `pred`
        logits = network(image)
        assert torch.equal(logits, network.forward_heads(image)["seg"])
    assert logits.shape[1] == metadata["network_data_format"]["outputs"]["pred"]["num_channels"]


def test_metadata_schema_and_network_check_reject_wrong_metadata(metadata, tmp_path):
    schema = str(BUNDLE / metadata["schema"])  # relative to the bundle root
    broken = json.loads(json.dumps(metadata))
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    broken["changelog"]["latest"] = "not a version"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="num_channels|latest"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=schema)
    wrong = json.loads(json.dumps(metadata))
    wrong["network_data_format"]["outputs"]["pred"]["num_channels"] = 3
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    verify_metadata(meta_file=str(tmp_path / "wrong.json"), filepath=schema)  # valid metadata, wrong for the network
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(net_id="network_def", meta_file=str(tmp_path / "wrong.json"), config_file=str(CONFIGS / "inference.json"),
                          device="cpu")
    assert metadata["version"] in metadata["changelog"]
