"""A training run killed mid-epoch and resumed with ``--ckpt_path last`` ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_NET

from cmr_ood.data.datamodule import MixedBatches, SliceDataModule
from cmr_ood.train import AtomicCheckpointIO, TrainingCLI, main
from cmr_ood.training.module import SegmentationModule

STEPS_PER_EPOCH, EPOCHS, EVERY = 4, 3, 5  # 12 steps; checkpoints after steps 5 (mid-epoch) and 10
KILLED_AFTER = 7  # steps done when the run dies: it resumes from step 5, across an epoch's end and a validation


class KillAt(pl.Callback):
    """Kills its own process with SIGKILL (nothing is cleaned up or saved) once ``steps`` optimiser steps are done."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.steps:
            os.kill(os.getpid(), signal.SIGKILL)


def arguments(root, manifest, workdir) -> list[str]:
    """The training command line on the synthetic dataset: tiny network, segmentation with MIM and slice position
    (MIM masks are random draws of the training step, so the training step's random state is exercised too)."""
    return [
        "fit", f"--data.manifest={manifest}", f"--data.data_root={root}", "--data.train_folds=[1, 2]", "--data.val_folds=[0]",
        "--data.canvas=64", "--data.batch_size=8", f"--data.steps_per_epoch={STEPS_PER_EPOCH}",
        f"--data.cache_dir={Path(workdir).parent / 'cache'}", "--data.augment.patch_size=48", "--model.network=cmr_ood.networks.CMRUNet",
        f"--model.network.channels={TINY_NET['channels']}", "--model.network.num_res_units=1", "--model.tasks={seg: 1.0, mim: 1.0, position: 0.5}",
        "--model.lr=0.01", "--model.warmup_steps=2", f"--trainer.max_epochs={EPOCHS}", "--trainer.accelerator=cpu",
        "--trainer.deterministic=true", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={workdir}", f"--checkpoint_every_n_steps={EVERY}",
    ]


@pytest.fixture
def reproducible_torch(monkeypatch):
    """One CPU thread (tiny tensors gain nothing from more, and a run and its resumption must reduce in the same
    order) and deterministic algorithms, which ``trainer.deterministic`` switches on for the whole process:
    both restored afterwards."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocess
    threads = torch.get_num_threads()
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def weights(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def test_killed_run_resumes_from_last_checkpoint_and_ends_like_an_uninterrupted_run(synthetic_dataset, tmp_path, reproducible_torch):
    root, manifest = synthetic_dataset
    whole = main(arguments(root, manifest, tmp_path / "whole"))
    assert whole.trainer.global_step == STEPS_PER_EPOCH * EPOCHS

    # the same run in a process killed after 7 steps: its last checkpoint is the one of step 5
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "cmr_ood.train", *arguments(root, manifest, killed),
                             f"--trainer.callbacks+={__name__}.KillAt", f"--trainer.callbacks.steps={KILLED_AFTER}"],
                            env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    last = killed / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == EVERY
    assert checkpoint["SliceDataModule"] == {"seed": 0, "batches_taken": EVERY}

    resumed = main([*arguments(root, manifest, killed), "--ckpt_path=last"])
    assert resumed.trainer.global_step == STEPS_PER_EPOCH * EPOCHS
    expected, got = weights(whole), weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [k for k in expected if not torch.equal(expected[k], got[k])]

    # the datamodule's state is what makes it exact: without it the resumed run draws other batches and masks
    del checkpoint["SliceDataModule"]
    torch.save(checkpoint, tmp_path / "without_data_state.ckpt")
    drifted = main([*arguments(root, manifest, tmp_path / "drifted"), f"--ckpt_path={tmp_path / 'without_data_state.ckpt'}"])
    assert not all(torch.equal(expected[k], v) for k, v in weights(drifted).items())


def test_a_batch_of_the_stream_does_not_depend_on_the_batches_drawn_before():
    stream = lambda position=0: MixedBatches(torch.arange(10), 50, 8, STEPS_PER_EPOCH, 0.5, seed=3, position=position)  # noqa: E731
    first_epoch = list(stream())
    assert len(first_epoch) == STEPS_PER_EPOCH and first_epoch == list(stream())  # iterating does not move the position
    assert first_epoch == [stream().batch(t) for t in range(STEPS_PER_EPOCH)]
    # a stream resumed at batch 6 yields the rest of the second epoch: batches 6 and 7, as the uninterrupted stream drew them
    assert list(stream(6)) == [stream().batch(6), stream().batch(7)]
    assert stream().batch(6) != stream().batch(7)


def test_datamodule_counts_the_batches_it_hands_to_training_not_the_ones_fetched_ahead(synthetic_dataset, tmp_path):
    root, manifest = synthetic_dataset
    dm = SliceDataModule(manifest=str(manifest), data_root=str(root), train_folds=[1, 2], val_folds=[], canvas=64, batch_size=4,
                         steps_per_epoch=STEPS_PER_EPOCH, cache_dir=str(tmp_path))
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader), next(loader)  # fetched, never trained on
    assert dm.state_dict() == {"seed": dm.seed, "batches_taken": 0}
    dm.load_state_dict({"seed": 5, "batches_taken": 6})
    assert dm.seed == 5 and dm._train_batches.position == 6
    with pytest.raises(ValueError, match="SliceDataModule state: \\['batches_taken'\\] missing"):
        dm.load_state_dict({"seed": 5})


@pytest.mark.parametrize(("options", "expected"), [
    ([], {"every_n_train_steps": 50, "save_last": True, "save_top_k": 0}),
    (["--checkpoint_every_n_steps=7"], {"every_n_train_steps": 7, "save_last": True, "save_top_k": 0}),
    (["--trainer.enable_checkpointing=false"], None),
    (["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_epochs=2"], {"every_n_train_steps": 0}),
], ids=["default", "every-7-steps", "disabled", "own-checkpoint"])
def test_cli_adds_a_resumable_checkpoint_unless_configured_otherwise(tmp_path, options, expected):
    cli = TrainingCLI(SegmentationModule, SliceDataModule, run=False, args=[
        "--model.network=cmr_ood.networks.CMRUNet", f"--model.network.channels={TINY_NET['channels']}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *options])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    checkpoints = cli.trainer.checkpoint_callbacks
    if expected is None:
        assert checkpoints == []
        return
    assert len(checkpoints) == 1
    assert {k: getattr(checkpoints[0], k if k != "every_n_train_steps" else "_every_n_train_steps") for k in expected} == expected
    if "save_last" in expected:  # ours: in a folder that does not change from run to run, where `--ckpt_path last` finds it
        assert Path(checkpoints[0].dirpath) == tmp_path / "checkpoints"


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("dies while saving")


def test_a_checkpoint_that_fails_to_save_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 5, "weights": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="dies while saving"):
        io.save_checkpoint({"global_step": 10, "weights": torch.zeros(1000), "last": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 5
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left beside it
