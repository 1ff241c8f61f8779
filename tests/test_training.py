import pytest
import torch
from conftest import TINY_NET

from cmr_ood.data.datamodule import SliceDataModule
from cmr_ood.inference import load_weights
from cmr_ood.networks import CMRUNet
from cmr_ood.train import main


@pytest.mark.parametrize("options", [[], ["--trainer.precision=bf16-mixed", "--model.channels_last=true", "--trainer.max_epochs=1"]],
                         ids=["fp32", "bf16-channels-last"])
def test_lightning_cli_fit_trains_and_exports(synthetic_dataset, tmp_path, options):
    root, manifest = synthetic_dataset
    export = tmp_path / "model.pt"
    cli = main([
        "fit", f"--data.manifest={manifest}", f"--data.data_root={root}", "--data.train_folds=[1, 2]", "--data.val_folds=[0]",
        "--data.canvas=64", "--data.batch_size=8", "--data.steps_per_epoch=8", f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.augment.patch_size=48", "--model.network=cmr_ood.networks.CMRUNet",
        f"--model.network.channels={TINY_NET['channels']}", "--model.network.num_res_units=1", "--model.lr=0.01",
        "--model.warmup_steps=2", "--trainer.max_epochs=3", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=cmr_ood.training.module.ExportNetwork", f"--trainer.callbacks.path={export}", *options,
    ])
    metrics = cli.trainer.callback_metrics
    assert {"val/dice_LV", "val/dice_MYO", "val/dice_RV", "val/dice_mean"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss_epoch"])
    assert list((tmp_path / "cache").glob("slices-*.npz"))  # cache written for the next run
    net = load_weights(CMRUNet(**TINY_NET), export)  # the exported state dict loads into the bundle's class
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), cli.model.network.state_dict().values()))


def test_datamodule_low_label_subset_and_device_batches(synthetic_dataset, tmp_path):
    root, manifest = synthetic_dataset
    dm = SliceDataModule(manifest=str(manifest), data_root=str(root), train_folds=[0, 1, 2], val_folds=[],
                         low_label="seed0/2", canvas=64, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert {e["subject"] for e in dm.train_entries} == {"subject1", "subject2"}
    assert len(dm.train_data["images"]) == 4 * 4  # two subjects, two phases, four slices
    assert dm.train_data["labels"].max() == 3 and dm.val_dataloader() == []


def test_training_needs_no_simpleitk():
    """Only DICOM needs SimpleITK: training from a prepared slice cache must run where it is missing."""
    import subprocess
    import sys

    code = "import sys; sys.modules['SimpleITK'] = None; import cmr_ood.train, cmr_ood.inference, cmr_ood.evaluation"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
