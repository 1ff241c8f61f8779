import numpy as np
import pytest
import torch
from conftest import TINY_NET

from cmr_ood.data.cache import difference_2d, load_cache, save_cache, undo_difference_2d
from cmr_ood.data.datamodule import SliceDataModule
from cmr_ood.networks import CMRUNet, load_weights
from cmr_ood.train import main


def fit(root, manifest, tmp_path, *options):
    """The training command line on the synthetic dataset with a tiny network."""
    return main([
        "fit", f"--data.manifest={manifest}", f"--data.data_root={root}", "--data.train_folds=[1, 2]", "--data.val_folds=[0]",
        "--data.canvas=64", "--data.batch_size=8", "--data.steps_per_epoch=8", f"--data.cache_dir={tmp_path.parent / 'cache'}",
        "--data.augment.patch_size=48", "--model.network=cmr_ood.networks.CMRUNet",
        f"--model.network.channels={TINY_NET['channels']}", "--model.network.num_res_units=1", "--model.lr=0.01",
        "--model.warmup_steps=2", "--trainer.max_epochs=3", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=cmr_ood.training.module.ExportNetwork", f"--trainer.callbacks.path={tmp_path / 'model.pt'}", *options,
    ])


@pytest.mark.parametrize("options", [[], ["--trainer.precision=bf16-mixed", "--model.channels_last=true", "--trainer.max_epochs=1"]],
                         ids=["fp32", "bf16-channels-last"])
def test_lightning_cli_fit_trains_and_exports(synthetic_dataset, tmp_path, options):
    cli = fit(*synthetic_dataset, tmp_path, *options)
    metrics = cli.trainer.callback_metrics
    assert {"val/dice_LV", "val/dice_MYO", "val/dice_RV", "val/dice_mean"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss_epoch"])
    assert list((tmp_path.parent / "cache").glob("slices-*"))  # cache written for the next run
    net = load_weights(CMRUNet(**TINY_NET), tmp_path / "model.pt")  # the exported state dict loads into the bundle's class
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), cli.model.network.state_dict().values()))


def test_multi_task_training_learns_every_task_and_exports_its_heads(synthetic_dataset, tmp_path):
    cli = fit(*synthetic_dataset, tmp_path, "--model.tasks={seg: 1.0, mim: 1.0, position: 0.5}", "--trainer.max_epochs=4")
    metrics = cli.trainer.callback_metrics
    assert {"train/loss_seg", "train/loss_mim", "train/loss_position", "val/loss_mim", "val/loss_position", "val/dice_mean"} <= set(metrics)
    # the heads came from the tasks; the export loads strictly into a network that declares them
    net = load_weights(CMRUNet(heads={"mim": 1, "position": 1}, **TINY_NET), tmp_path / "model.pt")
    assert set(net.heads) == {"seg", "mim", "position"}


def test_proxy_heads_learn_their_targets(synthetic_dataset, tmp_path):
    """A few optimiser steps on the module's own losses: position and reconstruction beat a constant guess."""
    from cmr_ood.training.module import SegmentationModule

    root, manifest = synthetic_dataset
    dm = SliceDataModule(manifest=str(manifest), data_root=str(root), train_folds=[0, 1, 2], val_folds=[], canvas=48,
                         cache_dir=str(tmp_path))
    dm.setup("fit")
    first_stacks = dm.train_data["volume"] < 4
    batch = {"image": dm.train_data["images"][first_stacks].unsqueeze(1).float() / 255.0, "position": dm.train_data["position"][first_stacks]}
    torch.manual_seed(0)
    module = SegmentationModule(CMRUNet(**TINY_NET), tasks={"mim": 1.0, "position": 1.0})
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(120):
        losses = module.task_losses(batch, module.tasks)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    losses = module.task_losses(batch, module.tasks)
    assert losses["position"] < 0.5 * torch.var(batch["position"])
    assert losses["mim"] < 0.8 * torch.mean((batch["image"] - batch["image"].mean()) ** 2)


def test_pretraining_then_fine_tuning_with_a_frozen_encoder(synthetic_dataset, tmp_path):
    pre = fit(*synthetic_dataset, tmp_path / "pre", "--model.tasks={mim: 1.0}", "--trainer.max_epochs=1")
    assert "val/dice_mean" not in pre.trainer.callback_metrics and "train/loss_mim" in pre.trainer.callback_metrics
    pretrained = torch.load(tmp_path / "pre" / "model.pt", weights_only=True)
    tuned = fit(*synthetic_dataset, tmp_path / "tune", f"--model.init_weights={tmp_path / 'pre' / 'model.pt'}",
                "--model.freeze_encoder=true", "--trainer.max_epochs=1")
    state = tuned.model.network.state_dict()
    assert "heads.mim.weight" not in state  # the proxy head is left behind
    assert all(torch.equal(state[k], pretrained[k]) for k in state if k.startswith("encoder."))
    assert not all(torch.equal(state[k], pretrained[k]) for k in state if k.startswith("decoder."))


def test_unknown_task_and_mismatched_weights_are_refused(tmp_path):
    from cmr_ood.training.module import SegmentationModule

    with pytest.raises(ValueError, match="choose among"):
        SegmentationModule(CMRUNet(**TINY_NET), tasks={"seg": 1.0, "jigsaw": 1.0})
    torch.save(CMRUNet(channels=[4, 8, 32], num_res_units=1).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another network shape"):
        load_weights(CMRUNet(**TINY_NET), tmp_path / "other.pt", strict=False)
    partial = {k: v for k, v in CMRUNet(**TINY_NET).state_dict().items() if not k.startswith("encoder.0.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="outside its heads"):
        load_weights(CMRUNet(**TINY_NET), tmp_path / "partial.pt", strict=False)


def test_datamodule_low_label_subset_and_unlabelled_slices(synthetic_dataset, tmp_path):
    root, manifest = synthetic_dataset
    dm = SliceDataModule(manifest=str(manifest), data_root=str(root), train_folds=[0, 1, 2], val_folds=[],
                         low_label="seed0/2", canvas=64, batch_size=8, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert len(dm.train_data["images"]) == 6 * 2 * 4  # every training slice is cached ...
    assert int(dm.labelled.sum()) == 2 * 2 * 4  # ... the subset's two subjects are labelled
    labelled_subjects = {dm.train_entries[int(v)]["subject"] for v in dm.train_data["volume"][dm.labelled]}
    assert labelled_subjects == {"subject1", "subject2"} and dm.val_dataloader() == []
    assert all(dm.labelled[b].all() for b in dm.train_dataloader())  # supervised: labelled slices only
    dm.unlabelled = True
    batches = list(dm.train_dataloader())
    assert all(dm.labelled[b[:4]].all() for b in batches)  # half of each batch labelled ...
    assert not all(dm.labelled[b].all() for b in batches)  # ... the rest drawn from every slice
    assert torch.allclose(dm.train_data["position"].unique(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))


def test_slice_cache_stores_images_exactly_and_compactly(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3, 20, 17), dtype=np.uint8)
    assert np.array_equal(undo_difference_2d(difference_2d(noise)), noise)  # exact, wrap-around included
    yy, xx = np.mgrid[:64, :64]
    smooth = np.stack([(128 + 100 * np.sin(yy / 9 + k) * np.cos(xx / 7)).astype(np.uint8) for k in range(8)])
    data = {"images": smooth, "labels": (smooth > 150).astype(np.uint8), "volume": np.arange(8, dtype=np.int32) // 4}
    save_cache(tmp_path / "c.npz.xz", data)
    back = load_cache(tmp_path / "c.npz.xz")
    assert all(np.array_equal(back[k], data[k]) and back[k].dtype == data[k].dtype for k in data)
    np.savez_compressed(tmp_path / "plain.npz", **data)
    assert (tmp_path / "c.npz.xz").stat().st_size < 0.8 * (tmp_path / "plain.npz").stat().st_size
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []


def test_cross_validation_folds_share_one_slice_cache(synthetic_dataset, tmp_path):
    """Every split of the same folds reads one cache; each split sees exactly its own volumes, in manifest order."""
    root, manifest = synthetic_dataset
    splits = []
    for val_fold in (0, 1):
        dm = SliceDataModule(manifest=str(manifest), data_root=str(root), train_folds=[f for f in (0, 1, 2) if f != val_fold],
                             val_folds=[val_fold], canvas=48, cache_dir=str(tmp_path))
        dm.setup("fit")
        splits.append(dm)
    assert len(list(tmp_path.glob("slices-*"))) == 1
    first, second = splits
    for dm in splits:
        assert {e["fold"] for e in dm.train_entries}.isdisjoint({e["fold"] for e in dm.val_entries})
        assert torch.equal(dm.train_data["volume"].unique(), torch.arange(len(dm.train_entries), dtype=torch.int32))
        assert (len(dm.train_data["images"]), len(dm.val_data["images"])) == (4 * 2 * 4, 2 * 2 * 4)  # subjects x phases x slices
    # fold 0 is validation in the first split and training in the second: the same slices, labels and positions
    in_second = torch.isin(second.train_data["volume"], torch.tensor([i for i, e in enumerate(second.train_entries) if e["fold"] == 0]))
    for key in ("images", "labels", "position"):
        assert torch.equal(first.val_data[key], second.train_data[key][in_second])


def test_ddp_config_trains_with_two_cpu_processes(synthetic_dataset, tmp_path):
    import subprocess
    import sys

    from helpers import BUNDLE

    root, manifest = synthetic_dataset
    args = [sys.executable, "-m", "cmr_ood.train", "fit", f"--config={BUNDLE / 'configs' / 'ddp.yaml'}", f"--data.manifest={manifest}",
            f"--data.data_root={root}", "--data.train_folds=[1, 2]", "--data.val_folds=[0]", "--data.canvas=64", "--data.batch_size=4",
            "--data.steps_per_epoch=3", f"--data.cache_dir={tmp_path / 'cache'}", "--data.augment.patch_size=48",
            "--model.network=cmr_ood.networks.CMRUNet", f"--model.network.channels={TINY_NET['channels']}", "--model.network.num_res_units=1",
            "--model.tasks={seg: 1.0, position: 1.0}", "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=cmr_ood.training.module.ExportNetwork",
            f"--trainer.callbacks.path={tmp_path / 'model.pt'}"]
    result = subprocess.run(args, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    load_weights(CMRUNet(heads={"position": 1}, **TINY_NET), tmp_path / "model.pt")


def test_each_rank_draws_its_own_batches():
    from cmr_ood.data.datamodule import MixedBatches

    draw = lambda seed: list(MixedBatches(torch.arange(10), 50, 8, 3, 0.5, seed))  # noqa: E731
    assert draw(0) == draw(0) and draw(0) != draw(1000)


def test_training_needs_no_simpleitk():
    """Only DICOM needs SimpleITK: training from a prepared slice cache must run where it is missing."""
    import subprocess
    import sys

    code = "import sys; sys.modules['SimpleITK'] = None; import cmr_ood.train, cmr_ood.inference, cmr_ood.evaluation"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr
