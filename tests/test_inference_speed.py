"""Stage timing and the overlap of batch inference (reading ahead, finishing cases in worker threads): same
records and files as the plain sequential loop, failures still become records, nothing half-written is left behind."""

import json
import os
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import save_nifti, synthetic_heart
from test_inference_hardening import detectors, fitted_scorer_state, small_cases, stray_temporaries, tiny_segmenter

import cmr_ood.inference as inference
from cmr_ood.inference import CASES_FILE, LOCK_FILE, PROGRESS_FILE, TABLE_FILE, Segmenter, _cases, run_batch, segment_case
from cmr_ood.ood import OODScorer
from cmr_ood.timing import STAGES, StageTimer, stage

pytestmark = pytest.mark.usefixtures("one_thread")


def cases_with_a_broken_one(folder, count=5, broken_at=2):
    small_cases(folder, count)
    broken = folder / f"case{broken_at}.nii.gz"
    broken.write_bytes(broken.read_bytes()[:-200])  # a truncated download, in the middle of the run
    return folder


def without_timings(records, out):
    text = json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in records])
    return json.loads(text.replace(str(out), "<out>"))


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.nii.gz"))}


def test_overlapped_run_gives_the_records_and_bytes_of_the_sequential_one(tmp_path):
    data = cases_with_a_broken_one(tmp_path / "data")
    sequential = run_batch(tiny_segmenter(), tmp_path / "seq", dataset_dir=data, prefetch=0, workers=0, timing="wall")
    overlapped = run_batch(tiny_segmenter(), tmp_path / "ovl", dataset_dir=data, prefetch=2, workers=3, timing="wall")
    assert [r["status"] for r in overlapped] == ["ok", "ok", "error", "ok", "ok"]  # input order, one record each
    assert "case2.nii.gz" in overlapped[2]["image"] and "truncated or corrupt" in overlapped[2]["error"]
    assert without_timings(overlapped, tmp_path / "ovl") == without_timings(sequential, tmp_path / "seq")
    assert without_timings(json.loads((tmp_path / "ovl" / CASES_FILE).read_text()), tmp_path / "ovl") == \
        without_timings(overlapped, tmp_path / "ovl")
    seq_files, ovl_files = files_of(tmp_path / "seq"), files_of(tmp_path / "ovl")
    assert len(ovl_files) == 4 and ovl_files == seq_files  # byte for byte
    for out in ("seq", "ovl"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == sorted([CASES_FILE, TABLE_FILE] + list(seq_files))


def test_scored_overlapped_run_matches_and_times_the_ood_stage(tmp_path):
    state = fitted_scorer_state(tmp_path)
    data = small_cases(tmp_path / "data", 3)

    def run(name, prefetch):
        scorer = OODScorer(detectors(), default="entropy_fg", state=state)
        return run_batch(tiny_segmenter(), tmp_path / name, dataset_dir=data, scorer=scorer, prefetch=prefetch, workers=prefetch,
                         timing="wall")

    sequential, overlapped = run("seq", 0), run("ovl", 3)
    assert without_timings(overlapped, tmp_path / "ovl") == without_timings(sequential, tmp_path / "seq")
    assert files_of(tmp_path / "ovl") == files_of(tmp_path / "seq") and len(files_of(tmp_path / "seq")) == 6
    for record in overlapped:
        assert list(record["seconds"]) == list(STAGES)  # every stage, in order
        assert all(v >= 0 for v in record["seconds"].values())


def test_reading_and_the_host_work_run_in_their_own_threads(tmp_path, monkeypatch):
    data = small_cases(tmp_path / "data", 6)
    threads = {"read": set(), "network": set(), "postprocess": set(), "qc": set(), "write": set()}

    network_order = []

    def spy(name, function):
        def spied(*args, **kwargs):
            threads[name].add(threading.current_thread().name)
            if name == "read" and str(args[0]["image"]).endswith("case0.nii.gz"):
                time.sleep(0.1)  # a slow read: the next case's reader finishes first
            if name == "network":
                network_order.extend(os.path.basename(v.path) for v in args[1])
            if name == "postprocess":
                time.sleep(0.05)  # slow host work: the other workers take the next cases meanwhile
            return function(*args, **kwargs)
        return spied

    for name, owner, attribute in (("read", inference, "read_case"), ("network", inference.Segmenter, "network_passes"),
                                   ("postprocess", inference.Segmenter, "postprocess"), ("qc", inference, "measurements"),
                                   ("write", inference, "write_like")):
        monkeypatch.setattr(owner, attribute, spy(name, getattr(owner, attribute)))
    main = threading.current_thread().name
    records = run_batch(tiny_segmenter(), tmp_path / "ovl", dataset_dir=data, prefetch=2, workers=3)
    assert [r["status"] for r in records] == ["ok"] * 6
    assert threads["read"] == {"cmr_ood-reader_0", "cmr_ood-reader_1"} and threads["network"] == {main}
    assert network_order == [f"case{i}.nii.gz" for i in range(6)]  # the network takes the cases in input order
    assert threads["postprocess"] == threads["qc"] == threads["write"] and len(threads["write"]) >= 2
    assert threads["write"] <= {f"cmr_ood-worker-{i}" for i in range(3)}
    threads = {k: set() for k in threads}
    run_batch(tiny_segmenter(), tmp_path / "seq", dataset_dir=data, prefetch=0, workers=0)
    assert all(names == {main} for names in threads.values())


def test_a_case_failing_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    data = small_cases(tmp_path / "data", 4)
    save = nib.save

    def fail_on_case1(img, path):
        save(img, path)  # the temporary file exists when the disk "fills up"
        if "case1_seg" in os.path.basename(path):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", fail_on_case1)
    records = run_batch(tiny_segmenter(), tmp_path / "out", dataset_dir=data, prefetch=2)
    assert [r["status"] for r in records] == ["ok", "error", "ok", "ok"]
    assert "No space left on device" in records[1]["error"] and records[1]["outputs"] == {}
    assert stray_temporaries(tmp_path / "out") == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([CASES_FILE, TABLE_FILE] + [f"case{i}_seg.nii.gz" for i in (0, 2, 3)])


def test_an_interrupted_overlapped_run_leaves_finished_cases_only_and_resumes(tmp_path):
    data, out = small_cases(tmp_path / "data", 5), tmp_path / "out"
    segmenter, calls = tiny_segmenter(), []
    network_passes = segmenter.network_passes

    def interrupt_at_the_fourth(volumes, scorer=None):
        calls.extend(v.path for v in volumes)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while earlier cases may still be waiting to be finished
        return network_passes(volumes, scorer)

    segmenter.batch_slices = 1  # one case a network call
    segmenter.network_passes = interrupt_at_the_fourth
    with pytest.raises(KeyboardInterrupt):
        run_batch(segmenter, out, dataset_dir=data, prefetch=2, workers=2)
    assert stray_temporaries(out) == [] and not (out / LOCK_FILE).exists() and not (out / CASES_FILE).exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("cmr_ood-")]
    lines = [json.loads(line) for line in (out / PROGRESS_FILE).read_text().splitlines()]
    finished = [x for x in lines if "status" in x]
    assert 1 <= len(finished) <= 3 and all(os.path.exists(p) for r in finished for p in r["outputs"].values())
    written = sorted(p.name for p in out.glob("*_seg.nii.gz"))
    assert written == sorted(os.path.basename(r["outputs"]["segmentation"]) for r in finished)  # no output without its record

    records = run_batch(tiny_segmenter(), out, dataset_dir=data, resume=True)
    assert [r["status"] for r in records] == ["ok"] * 5 and all(r in records for r in finished)  # kept as they were
    assert not (out / PROGRESS_FILE).exists() and stray_temporaries(out) == []


def test_cases_with_the_same_output_name_behave_as_in_a_sequential_run(tmp_path):
    data = tmp_path / "data"
    image = synthetic_heart(shape=(40, 36, 3))[0]
    save_nifti(data / "a.nii", image)
    save_nifti(data / "a.nii.gz", image)  # the same output name: the second case must find the first one's output
    sequential = run_batch(tiny_segmenter(), tmp_path / "seq", dataset_dir=data, prefetch=0, workers=0)
    overlapped = run_batch(tiny_segmenter(), tmp_path / "ovl", dataset_dir=data, prefetch=2, workers=2)
    assert [r["status"] for r in overlapped] == ["ok", "error"] and "exists already" in overlapped[1]["error"]
    assert without_timings(overlapped, tmp_path / "ovl") == without_timings(sequential, tmp_path / "seq")


def test_stage_timings_are_complete_and_add_up_to_the_case_wall_time(tmp_path):
    case = _cases(dataset_dir=small_cases(tmp_path / "data", 1))[0]
    segmenter = tiny_segmenter()
    segment_case(segmenter, case, tmp_path / "warm", False)
    timer = StageTimer()
    start = time.perf_counter()
    record = segment_case(segmenter, case, tmp_path / "out", False, timer=timer)
    wall = time.perf_counter() - start
    assert record["status"] == "ok" and "seconds" not in record  # a record has timings only when a run asks
    assert list(timer.rounded()) == ["read", "preprocess", "network", "postprocess", "qc", "write"]
    assert all(v >= 0 for v in timer.seconds.values()) and timer.seconds["network"] > 0
    assert timer.total == pytest.approx(wall, rel=0.05, abs=0.005)
    seconds = run_batch(segmenter, tmp_path / "batch", dataset_dir=tmp_path / "data", prefetch=0, workers=0, timing="wall")[0]["seconds"]
    assert list(seconds) == list(timer.rounded()) and all(v >= 0 for v in seconds.values())


def test_nested_stages_count_once_and_unmarked_code_is_free():
    timer = StageTimer()
    with stage("network"):  # no active timer: nothing is charged anywhere
        time.sleep(0.01)
    assert timer.seconds == {}
    start = time.perf_counter()
    with timer.activate():
        with stage("ood"):
            time.sleep(0.02)
            with stage("network"):  # e.g. a sampling detector running the network again
                time.sleep(0.05)
            time.sleep(0.01)
    wall = time.perf_counter() - start
    assert timer.seconds["network"] >= 0.05 and 0.03 <= timer.seconds["ood"] < 0.08  # counted as ood, it would be >= 0.08
    assert timer.total == pytest.approx(wall, abs=0.005)


def test_invalid_prefetch_workers_and_timing_are_refused(tmp_path):
    with pytest.raises(ValueError, match="prefetch must be a whole number"):
        run_batch(tiny_segmenter(), tmp_path / "out", dataset_dir=tmp_path, prefetch=-1)
    with pytest.raises(ValueError, match="workers must be a whole number"):
        run_batch(tiny_segmenter(), tmp_path / "out", dataset_dir=tmp_path, workers=1.5)
    with pytest.raises(ValueError, match="timing must be one of"):
        run_batch(tiny_segmenter(), tmp_path / "out", dataset_dir=tmp_path, timing="cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("views", [1, 2])
def test_cases_batched_through_the_network_get_the_results_of_one_case_at_a_time(tmp_path, views):
    state = fitted_scorer_state(tmp_path)
    data = small_cases(tmp_path / "data", 3)
    save_nifti(data / "larger.nii.gz", synthetic_heart(shape=(52, 44, 4), seed=7)[0])  # another slice size: its own batch
    save_nifti(data / "cine.nii.gz", np.stack([synthetic_heart(shape=(40, 36, 3), seed=10 + t)[0] for t in range(3)], axis=-1))

    def run(name, batch_slices):
        segmenter, calls = tiny_segmenter(), []
        segmenter.batch_slices, segmenter.views = batch_slices, views
        network_passes = segmenter.network_passes
        segmenter.network_passes = lambda volumes, scorer=None: calls.append(len(volumes)) or network_passes(volumes, scorer)
        scorer = OODScorer(detectors(), default="entropy_fg", state=state)
        return run_batch(segmenter, tmp_path / name, dataset_dir=data, scorer=scorer, timing="wall"), calls

    (alone, alone_calls), (batched, batched_calls) = run("alone", 1), run("batched", 64)
    assert alone_calls == [1] * 5 and batched_calls == [5]  # 3 + 4 + 3 x 3 + 3 + 3 slices: one call
    for one, many in zip(alone, batched):
        assert one["status"] == many["status"] == "ok" and one["image"] == many["image"]
        assert many["scores"] == pytest.approx(one["scores"], rel=1e-4, abs=1e-6)
        labels = [nib.load(r["outputs"]["segmentation"]).get_fdata() for r in (one, many)]
        assert labels[0].shape == labels[1].shape and (labels[0] == labels[1]).mean() > 0.999
        assert sum(many["seconds"].values()) > 0 and many["seconds"]["network"] > 0  # the batch's time, shared out
    cine = next(r for r in batched if r["image"].endswith("cine.nii.gz"))
    assert len(cine["measurements"]["lv_volume_ml"]) == 3  # a cine's frames come back as one case


def test_bfloat16_inference_runs_the_network_in_bfloat16_and_agrees_with_float32(tmp_path, monkeypatch):
    state = fitted_scorer_state(tmp_path)
    data = small_cases(tmp_path / "data", 3)

    def run(precision):
        segmenter, dtypes = tiny_segmenter(), set()
        segmenter.precision = precision
        convolutions = [m for m in segmenter.network.modules() if isinstance(m, torch.nn.Conv2d)]
        for conv in convolutions:
            conv.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        scorer = OODScorer(detectors(), default="entropy_fg", state=state)
        return run_batch(segmenter, tmp_path / precision, dataset_dir=data, scorer=scorer), dtypes

    (full, full_dtypes), (half, half_dtypes) = run("float32"), run("bfloat16")
    assert full_dtypes == {torch.float32} and half_dtypes == {torch.bfloat16}
    for a, b in zip(full, half):
        labels = [nib.load(r["outputs"]["segmentation"]).get_fdata() for r in (a, b)]
        assert (labels[0] == labels[1]).mean() > 0.98
        assert b["scores"]["entropy_fg"] == pytest.approx(a["scores"]["entropy_fg"], rel=0.05)
    assert tiny_segmenter().network_precision == "float32"
    auto = Segmenter(tiny_segmenter().network, None, precision="auto")
    assert auto.network_precision == ("bfloat16" if inference.native_bfloat16(torch.device("cpu")) else "float32")
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: device.type == "cuda")
    auto.device = torch.device("cuda")  # as a distributed run moves the segmenter to its GPU: resolved there
    assert auto.network_precision == "bfloat16"
    with pytest.raises(ValueError, match="precision must be one of"):
        Segmenter(tiny_segmenter().network, None, precision="float16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_the_batched_bfloat16_run_agrees_with_the_plain_float32_one(tmp_path):
    state = fitted_scorer_state(tmp_path)
    data = small_cases(tmp_path / "data", 6)

    def run(name, precision, batch_slices, prefetch, workers):
        tiny = tiny_segmenter()
        segmenter = Segmenter(tiny.network, tiny.inferer, device="cuda", precision=precision, batch_slices=batch_slices, views=2)
        scorer = OODScorer(detectors(), default="entropy_fg", state=state)
        return run_batch(segmenter, tmp_path / name, dataset_dir=data, scorer=scorer, prefetch=prefetch, workers=workers)

    plain, fast = run("plain", "float32", 1, 0, 0), run("fast", "bfloat16", 64, 4, 3)
    for a, b in zip(plain, fast):
        assert a["status"] == b["status"] == "ok"
        labels = [nib.load(r["outputs"]["segmentation"]).get_fdata() for r in (a, b)]
        assert (labels[0] == labels[1]).mean() > 0.98
        assert b["scores"]["entropy_fg"] == pytest.approx(a["scores"]["entropy_fg"], rel=0.05)


def test_a_case_that_breaks_its_batch_fails_alone(tmp_path):
    data = small_cases(tmp_path / "data", 5)
    segmenter, calls = tiny_segmenter(), []
    segmenter.batch_slices = 64
    network_passes = segmenter.network_passes

    def fail_on_case1(volumes, scorer=None):
        calls.append(len(volumes))
        if any(v.path.endswith("case1.nii.gz") for v in volumes):
            raise RuntimeError("CUDA out of memory")  # e.g. a batch too large for the device
        return network_passes(volumes, scorer)

    segmenter.network_passes = fail_on_case1
    records = run_batch(segmenter, tmp_path / "out", dataset_dir=data)
    assert [r["status"] for r in records] == ["ok", "error", "ok", "ok", "ok"]
    assert "CUDA out of memory" in records[1]["error"] and calls == [5, 1, 1, 1, 1, 1]  # the batch, then case by case
