"""Inference and training over several processes: two CPU processes (gloo) started by torchrun or Lightning."""

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NET
from helpers import BUNDLE, leftover_temporaries, save_nifti, synthetic_heart
from monai.bundle import ConfigParser
from test_bundle import CONFIGS, tiny

from cmr_ood.distributed import merge_rank_records, predict_distributed, shard, trainer_options, write_rank_records
from cmr_ood.inference import CASES_FILE, TABLE_FILE, OutputDirError, OutputLock, run_batch
from cmr_ood.networks import CMRUNet, load_weights

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # standalone: a free port


def run(args, cwd=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, check=False)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_hold_every_case_exactly_once(world_size):
    for num_cases in (0, 1, 5, 12):
        shards = [shard(num_cases, rank, world_size) for rank in range(world_size)]
        assert sorted(i for s in shards for i in s) == list(range(num_cases))  # no repeat (no padding), no gap
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="outside a world of 2"):
        shard(5, 2, 2)


def test_rank_records_merge_in_manifest_order_and_gaps_or_repeats_are_refused(tmp_path):
    records = [{"image": f"case{i}.nii.gz", "status": "ok"} for i in range(5)]
    for rank in (1, 0):
        write_rank_records(tmp_path, rank, 2, 5, [(i, records[i]) for i in shard(5, rank, 2)])
    assert merge_rank_records(tmp_path, 2, 5) == records
    assert json.loads((tmp_path / CASES_FILE).read_text()) == records
    assert sorted(p.name for p in tmp_path.iterdir()) == [TABLE_FILE, CASES_FILE]  # the per-rank files are gone

    write_rank_records(tmp_path, 0, 2, 5, [(0, records[0]), (2, records[2])])
    write_rank_records(tmp_path, 1, 2, 5, [(1, records[1]), (3, records[3])])
    with pytest.raises(ValueError, match=r"no record for the cases at positions \[4\]"):
        merge_rank_records(tmp_path, 2, 5)
    write_rank_records(tmp_path, 1, 2, 5, [(1, records[1]), (2, records[2]), (3, records[3]), (4, records[4])])
    with pytest.raises(ValueError, match=r"case 2 \(case2.nii.gz\) has a record from another process"):
        merge_rank_records(tmp_path, 2, 5)
    with pytest.raises(ValueError, match="run of 2 processes over 5 cases, not this one"):
        merge_rank_records(tmp_path, 2, 6)
    (tmp_path / "cases.rank1.json").unlink()
    with pytest.raises(FileNotFoundError, match="cases.rank1.json: missing"):
        merge_rank_records(tmp_path, 2, 5)
    assert json.loads((tmp_path / CASES_FILE).read_text()) == records  # a refused merge leaves the results as they were


def test_trainer_options_follow_torchrun_and_keep_the_explicit_sharding(monkeypatch):
    segmenter = type("Segmenter", (), {"device": torch.device("cpu")})()
    options = trainer_options(segmenter, {"devices": 2, "num_nodes": None})
    assert options["accelerator"] == "cpu" and options["devices"] == 2 and options["num_nodes"] == 1
    assert options["use_distributed_sampler"] is False and options["logger"] is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    options = trainer_options(segmenter, {"devices": "auto", "num_nodes": None})
    assert (options["devices"], options["num_nodes"]) == (4, 2)  # torchrun's world: 2 nodes of 4 processes
    assert trainer_options(segmenter, {"devices": 3})["devices"] == 3  # an explicit number stays (Lightning checks it)
    with pytest.raises(ValueError, match="use_distributed_sampler must stay False"):
        trainer_options(segmenter, {"use_distributed_sampler": True})


@pytest.fixture(scope="module")
def five_cases(tmp_path_factory):
    """Four small synthetic stacks and a file that is no image, in a manifest."""
    root = tmp_path_factory.mktemp("five_cases")
    entries = []
    for i in range(4):
        image, _ = synthetic_heart(shape=(40 + 4 * i, 36, 4), radius=7 + i % 2, seed=i)
        save_nifti(root / f"site{i % 2}" / f"case{i}.nii.gz", image, spacing=(1.6, 1.6, 8.0))
        entries.append({"image": f"site{i % 2}/case{i}.nii.gz"})
    (root / "junk.nii.gz").write_bytes(gzip.compress(b"not an image at all" * 40))
    entries.insert(2, {"image": "junk.nii.gz"})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"training": entries}))
    return root, manifest, [str(root / e["image"]) for e in entries]


def bundle_segmenter(checkpoint):
    """The bundle's segmenter with the tiny network, built in this process."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), **{k: v for k, v in tiny(checkpoint).items() if k != "score_ood"}})
    return parser.get_parsed_content("segmenter")


def test_one_process_run_matches_run_batch_and_refuses_a_folder_in_use(five_cases, tiny_checkpoint, tmp_path):
    root, manifest, images = five_cases
    segmenter = bundle_segmenter(tiny_checkpoint)
    options = {"devices": 1, "enable_progress_bar": False}
    (tmp_path / "ours").mkdir()
    with OutputLock(tmp_path / "ours"):  # another run holds the folder: refused before any work
        with pytest.raises(OutputDirError, match="in use by another run"):
            predict_distributed(segmenter, tmp_path / "ours", manifest=str(manifest), data_root=str(root), trainer=options)
    assert [p.name for p in (tmp_path / "ours").iterdir()] == []
    ours = predict_distributed(segmenter, tmp_path / "ours", manifest=str(manifest), data_root=str(root), trainer=options)
    expected = run_batch(segmenter, tmp_path / "single", manifest=str(manifest), data_root=str(root))
    assert [r["image"] for r in ours] == images
    assert json.loads(json.dumps(ours).replace(str(tmp_path / "ours"), str(tmp_path / "single"))) == expected
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [TABLE_FILE, CASES_FILE, "site0", "site1"]
    with pytest.raises(FileExistsError, match="exists already"):
        predict_distributed(segmenter, tmp_path / "ours", manifest=str(manifest), data_root=str(root), trainer=options)


def test_bundle_under_torchrun_shards_the_cases_and_matches_a_single_process_run(five_cases, tiny_checkpoint, tmp_path):
    root, manifest, images = five_cases
    overrides = {"manifest": str(manifest), "data_root": str(root), **tiny(tiny_checkpoint)}
    args = ["-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file",
            json.dumps([str(CONFIGS / "inference.json"), str(CONFIGS / "inference_multi_gpu.json")]),
            "--output_dir", str(tmp_path / "multi")]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    result = run([*TORCHRUN, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2: 3 cases" in result.stdout and "process 1 of 2: 2 cases" in result.stdout  # strided, no padding

    expected = run_batch(bundle_segmenter(tiny_checkpoint), tmp_path / "single", manifest=str(manifest), data_root=str(root))

    merged = json.loads((tmp_path / "multi" / CASES_FILE).read_text())
    assert [r["image"] for r in merged] == images  # one record per case, in manifest order
    assert [r["status"] for r in merged] == ["ok", "ok", "error", "ok", "ok"]
    assert json.loads(json.dumps(merged).replace(str(tmp_path / "multi"), str(tmp_path / "single"))) == expected
    for ours, theirs in zip(merged, expected):
        for kind, path in ours["outputs"].items():
            assert np.array_equal(nib.load(path).get_fdata(), nib.load(theirs["outputs"][kind]).get_fdata())
    written = sorted(str(p.relative_to(tmp_path / "multi")) for p in (tmp_path / "multi").rglob("*") if p.is_file())
    assert [p for p in written if not p.startswith("report/")] == [
        TABLE_FILE, CASES_FILE, "site0/case0_seg.nii.gz", "site0/case2_seg.nii.gz", "site1/case1_seg.nii.gz", "site1/case3_seg.nii.gz",
    ]  # no per-rank file, lock or temporary left
    assert "report/index.html" in written  # written once, by rank 0, from the merged records
    assert leftover_temporaries(tmp_path / "multi") == []


def test_ddp_config_pretrains_under_torchrun_and_saves_a_checkpoint(synthetic_dataset, tmp_path):
    """Masked image modelling alone leaves the segmentation head out of the loss: DDP must allow it."""
    root, manifest = synthetic_dataset
    args = ["-m", "cmr_ood.train", "fit", f"--config={BUNDLE / 'configs' / 'ddp.yaml'}", f"--data.manifest={manifest}",
            f"--data.data_root={root}", "--data.train_folds=[1, 2]", "--data.val_folds=[0]", "--data.canvas=64", "--data.batch_size=4",
            "--data.steps_per_epoch=2", f"--data.cache_dir={tmp_path / 'cache'}", "--data.augment.patch_size=48",
            "--model.network=cmr_ood.networks.CMRUNet", f"--model.network.channels={TINY_NET['channels']}", "--model.network.num_res_units=1",
            "--model.tasks={mim: 1.0}", "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=cmr_ood.training.module.ExportNetwork", f"--trainer.callbacks.path={tmp_path / 'model.pt'}"]
    result = run([*TORCHRUN, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and "heads.mim.weight" in {k.removeprefix("network.") for k in checkpoint["state_dict"]}
    load_weights(CMRUNet(heads={"mim": 1}, **TINY_NET), tmp_path / "model.pt")
