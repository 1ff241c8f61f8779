import json

import torch
import yaml
from helpers import BUNDLE

from cmr_ood.networks import CMRUNet, load_weights

CONFIGS = BUNDLE / "configs"


def _recipe(name):
    return yaml.safe_load((CONFIGS / name).read_text())["model"]


def test_inference_network_matches_the_shipped_recipe_and_weights():
    network_def = json.loads((CONFIGS / "inference.json").read_text())["network_def"]
    args = {k: v for k, v in network_def.items() if not k.startswith("_") and k not in ("in_channels", "out_channels")}
    recipes = ("train.yaml", "finetune_full_fov.yaml", "finetune_fov_crops.yaml", "train_supervised.yaml", "train_cpu.yaml", "train_low_label.yaml")
    for name in recipes:
        network = _recipe(name)["network"]["init_args"]
        assert {k: args[k] for k in network} == network, name
    # the shipped recipe's proxy tasks are the heads the bundle builds (their losses are computed at inference)
    for name in ("train.yaml", "finetune_full_fov.yaml", "finetune_fov_crops.yaml"):
        assert set(args["heads"]) == set(_recipe(name)["tasks"]) - {"seg"}, name
    net = load_weights(CMRUNet(**args), BUNDLE / "models" / "model.pt")  # strict: every weight present
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_metadata_describes_outputs_and_references():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "intended_use", "data_source", "references", "eval_metrics",
                "network_data_format", "outputs"):
        assert key in meta
    assert "cases.json" in meta["outputs"] and meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    assert {"inference.json", "evaluate.json", "logging.conf"} <= {p.name for p in CONFIGS.iterdir()}
    assert (BUNDLE / "LICENSE").exists() and (BUNDLE / "docs" / "data_license.txt").exists()
