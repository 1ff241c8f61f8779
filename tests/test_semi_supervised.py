"""Quality-aware pseudo-labelling (semiQCSeg): the gate, the derived manifest, training on it, the benchmark loop."""

import json
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NET
from helpers import REPO, save_nifti, synthetic_heart

from cmr_ood.data.datamodule import SliceDataModule
from cmr_ood.data.io import CaseError
from cmr_ood.data.labels import MYO
from cmr_ood.data.manifests import load_manifest, read_entry
from cmr_ood.inference import Segmenter
from cmr_ood.networks import CMRUNet
from cmr_ood.ood import SoftmaxScore
from cmr_ood.ood.scorer import OODScorer
from cmr_ood.training.pseudo_labels import LOG_FILE, gate_scorer, pseudo_label

SPACING = (1.8, 1.8, 8.0)  # with radius 14 (ED) and 10 (ES) px: an adult-sized heart that passes QC
FOLD = {"s0": 0, "s1": 1, "s2": 1, "s3": 2, "s4": 2, "s5": 1, "s6": 2}
LABELLED, POOL = ["s1", "s5"], ["s2", "s3", "s4", "s6"]


@pytest.fixture(scope="module")
def plausible_dataset(tmp_path_factory):
    """Seven subjects with plausible ED/ES hearts (ACDC label values), fold 0 held out, a two-subject low-label subset."""
    root = tmp_path_factory.mktemp("semi_data")
    entries = []
    for i, (subject, fold) in enumerate(FOLD.items()):
        for phase, radius in (("ED", 14.0), ("ES", 10.0)):
            image, labels = synthetic_heart(shape=(80, 80, 6), radius=radius, seed=i, canonical=False)
            save_nifti(root / f"{subject}_{phase}.nii.gz", image, spacing=SPACING)
            save_nifti(root / f"{subject}_{phase}_gt.nii.gz", labels, spacing=SPACING, dtype=np.uint8)
            entries.append({"image": f"{subject}_{phase}.nii.gz", "label": f"{subject}_{phase}_gt.nii.gz", "subject": subject,
                            "phase": phase, "dataset": "acdc", "fold": fold})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"name": "synthetic", "low_label": {"seed0": {"2": LABELLED}}, "training": entries}))
    return root, manifest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("semi_model") / "model.pt"
    torch.save(CMRUNet(**TINY_NET).state_dict(), path)
    return path


NETWORK = {"class_path": "cmr_ood.networks.CMRUNet", "init_args": TINY_NET}


@pytest.fixture
def scripted_segmentations(monkeypatch, plausible_dataset):
    """The 'model' returns each volume's ground truth, except s3 (ED and ES swapped) and s4 (ED without myocardium)."""
    root, _ = plausible_dataset

    def truth(volume):
        subject, phase = volume.path.split("/")[-1].removesuffix(".nii.gz").split("_")
        if subject == "s3":
            phase = {"ED": "ES", "ES": "ED"}[phase]
        labels = read_entry({"image": f"{subject}_{phase}.nii.gz", "label": f"{subject}_{phase}_gt.nii.gz", "dataset": "acdc"},
                            root)[1].array.astype(np.uint8)
        if subject == "s4" and phase == "ED":
            labels[labels == MYO] = 0
        return labels

    monkeypatch.setattr(Segmenter, "segment", lambda self, volume: truth(volume))
    monkeypatch.setattr(Segmenter, "segment_and_score",
                        lambda self, volume, scorer: (truth(volume), {"entropy_fg": 0.9 if "s2_ES" in volume.path else 0.1}, None))


def test_qc_gate_keeps_plausible_subjects_and_logs_why_others_were_rejected(plausible_dataset, checkpoint, scripted_segmentations,
                                                                           tmp_path):
    root, manifest = plausible_dataset
    log = pseudo_label(checkpoint, NETWORK, manifest, POOL, tmp_path / "qc", gate="qc", labelled=LABELLED, train_folds=[1, 2],
                       data_root=root)
    assert log["kept"] == ["s2", "s6"] and set(log["rejected"]) == {"s3", "s4"}
    assert any("ES volume" in r and "not below its ED volume" in r for r in log["rejected"]["s3"]), log["rejected"]["s3"]
    assert any(r.startswith("ED: myocardium covers only 0%") for r in log["rejected"]["s4"]), log["rejected"]["s4"]
    assert json.loads((tmp_path / "qc" / LOG_FILE).read_text())["rejected"] == log["rejected"]

    derived = load_manifest(tmp_path / "qc" / "manifest.json")
    by_key = {(e["subject"], e["phase"]): e for e in derived["training"]}
    assert by_key["s1", "ED"]["label"] == "s1_ED_gt.nii.gz" and by_key["s0", "ED"]["label"] == "s0_ED_gt.nii.gz"  # real labels kept
    assert not any("label" in by_key[s, p] for s in ("s3", "s4") for p in ("ED", "ES"))  # the rest unlabelled
    assert derived["low_label"] == {"seed0": {"2": LABELLED}} and derived["pseudo_labels"]["gate"] == "qc"
    # the kept pseudo-label reads back through the manifest: canonical values on the image's grid, as segmented
    image, label = read_entry(by_key["s2", "ES"], root)
    _, truth = read_entry({"image": "s2_ES.nii.gz", "label": "s2_ES_gt.nii.gz", "dataset": "acdc"}, root)
    assert by_key["s2", "ES"]["pseudo_label"] and np.array_equal(label.array, truth.array)
    assert np.allclose(nib.load(str(tmp_path / "qc" / by_key["s2", "ES"]["label"])).affine, nib.load(str(root / "s2_ES.nii.gz")).affine)

    plain = pseudo_label(checkpoint, NETWORK, manifest, POOL, tmp_path / "none", gate="none", labelled=LABELLED, train_folds=[1, 2],
                         data_root=root)
    assert plain["kept"] == POOL and plain["subjects"]["s3"]["qc_passed"] is False  # QC measured, not applied
    with pytest.raises(FileExistsError):
        pseudo_label(checkpoint, NETWORK, manifest, POOL, tmp_path / "none", gate="none", labelled=LABELLED, data_root=root)


def test_ood_gate_rejects_a_flagged_frame_and_refuses_to_run_without_a_scorer(plausible_dataset, checkpoint, scripted_segmentations,
                                                                              tmp_path):
    root, manifest = plausible_dataset
    with pytest.raises(ValueError, match="needs a fitted OOD scorer"):
        pseudo_label(checkpoint, NETWORK, manifest, POOL, tmp_path, gate="qc+ood", labelled=LABELLED, data_root=root)
    scorer = OODScorer([SoftmaxScore("entropy")], default="entropy_fg")
    scorer.thresholds = {"entropy_fg": 0.5}
    log = pseudo_label(checkpoint, NETWORK, manifest, ["s2", "s6"], tmp_path, gate="qc+ood", scorer=scorer, labelled=LABELLED,
                       train_folds=[1, 2], data_root=root)
    assert log["kept"] == ["s6"] and log["rejected"]["s2"] == ["ES: OOD score entropy_fg 0.9 above its threshold 0.5"]
    assert log["subjects"]["s2"]["qc_passed"] and log["subjects"]["s2"]["ood"]["ED"] == {"score": 0.1, "flagged": False}


def test_bad_requests_and_unreadable_subjects(plausible_dataset, checkpoint, scripted_segmentations, tmp_path, monkeypatch):
    root, manifest = plausible_dataset
    with pytest.raises(ValueError, match="unknown gate"):
        pseudo_label(checkpoint, NETWORK, manifest, POOL, tmp_path, gate="strict", data_root=root)
    with pytest.raises(ValueError, match="both labelled and to be pseudo-labelled"):
        pseudo_label(checkpoint, NETWORK, manifest, ["s1"], tmp_path, labelled=["s1"], data_root=root)
    with pytest.raises(ValueError, match=r"not in the training folds"):
        pseudo_label(checkpoint, NETWORK, manifest, ["s0"], tmp_path, train_folds=[1, 2], data_root=root)

    def unreadable(self, volume):
        raise CaseError(volume.path, "non-finite values")

    monkeypatch.setattr(Segmenter, "segment", unreadable)
    log = pseudo_label(checkpoint, NETWORK, manifest, ["s2"], tmp_path, labelled=LABELLED, data_root=root)
    assert log["kept"] == [] and "non-finite values" in log["rejected"]["s2"][0]


def test_derived_manifest_trains_with_pseudo_labelled_slices_counted_as_labelled(plausible_dataset, checkpoint,
                                                                                 scripted_segmentations, tmp_path):
    from test_training import fit

    root, manifest = plausible_dataset
    log = pseudo_label(checkpoint, NETWORK, manifest, POOL, tmp_path / "pseudo", gate="qc", labelled=LABELLED, train_folds=[1, 2],
                       data_root=root)
    dm = SliceDataModule(manifest=log["manifest"], data_root=str(root), train_folds=[1, 2], val_folds=[0], low_label="seed0/2",
                         canvas=64, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    # unlabelled and rejected subjects are left out; the subset's slices and the pseudo-labelled ones are labelled
    assert [e["subject"] for e in dm.train_entries] == ["s1", "s1", "s2", "s2", "s5", "s5", "s6", "s6"]
    assert bool(dm.labelled.all()) and len(dm.labelled) == 8 * 6
    real = SliceDataModule(manifest=str(manifest), data_root=str(root), train_folds=[1, 2], val_folds=[], low_label="seed0/2",
                           canvas=64, cache_dir=str(tmp_path / "cache"))
    real.setup("fit")  # the same subjects with their real labels: only the subset's slices count
    assert int(real.labelled.sum()) == 4 * 6 and len(real.labelled) == 12 * 6
    cli = fit(root, log["manifest"], tmp_path / "run", "--data.low_label=seed0/2", "--data.steps_per_epoch=2",
              "--trainer.max_epochs=1")
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


def test_gate_scorer_is_the_bundles_default_score_with_single_pass_detectors():
    scorer = gate_scorer()
    config = json.loads((REPO / "bundles" / "cmr_seg_ood" / "configs" / "inference.json").read_text())
    assert scorer.default == config["ood_default"]
    parts = config["ood_combinations"][scorer.default]["scores"]
    assert {n for d in scorer.detectors for n in d.score_names} >= set(parts)
    assert "position" not in {d.name for d in scorer.detectors}


def test_benchmark_loop_smoke_run_on_cpu(plausible_dataset, tmp_path, monkeypatch, capsys):
    root, manifest = plausible_dataset
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import semi_supervised

    start = time.perf_counter()
    results = semi_supervised.main(["--accelerator", "cpu", "--tiny", "--sizes", "2", "--seeds", "0", "--variants", "supervised", "qc+ood",
                                    "--manifest", str(manifest), "--data_root", str(root), "--runs", str(tmp_path / "runs"),
                                    "--data.train_folds=[1, 2]", f"--data.cache_dir={tmp_path / 'cache'}"])
    assert set(results) == {"supervised/2/seed0/round0", "qc+ood/2/seed0/round1"}
    assert all(np.isfinite(m["val/dice_mean"]) for m in results.values())
    assert results["qc+ood/2/seed0/round1"]["unlabelled_pool"] == 4  # s2, s3, s4, s6 (fold 0 held out)
    assert (tmp_path / "runs" / "qc-ood_2_seed0_round1" / "ood_gate" / "ood_state.pt").exists()
    table = capsys.readouterr().out
    assert "| supervised |" in table and "| qc+ood |" in table
    # resumable: a second call finds every run done and trains nothing
    assert semi_supervised.main(["--accelerator", "cpu", "--tiny", "--sizes", "2", "--seeds", "0", "--variants", "supervised",
                                 "qc+ood", "--manifest", str(manifest), "--data_root", str(root), "--runs", str(tmp_path / "runs")]) == results
    print(f"smoke run {time.perf_counter() - start:.0f} s")
