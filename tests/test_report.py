"""The HTML report of an inference run, on a tiny synthetic run folder."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import BUNDLE, leftover_temporaries, save_nifti, synthetic_heart
from monai.bundle import ConfigParser

from cmr_ood.ood import SoftmaxScore
from cmr_ood.ood.scorer import OODScorer
from cmr_ood.report import main, representative_slices, review_order, scorer_from_config, write_report

SPACING = (1.5, 1.5, 8.0)
VALIDATION = [0.1 * k for k in range(1, 11)]  # 0.1 .. 1.0


def _ok(image, seg, uncertainty, score, flagged, qc_failed=(), measurements=None, shape=(48, 40, 6)):
    return {"image": str(image), "status": "ok", "error": None,
            "outputs": {"segmentation": str(seg), **({"uncertainty": str(uncertainty)} if uncertainty else {})},
            "measurements": measurements or {"lv_volume_ml": 80.0, "rv_volume_ml": 70.0, "myo_volume_ml": 60.0, "myo_mass_g": 63.0},
            "scores": {"entropy_fg": score}, "default_score": score, "default_detector": "entropy_fg", "ood_flag": flagged,
            "shape": list(shape), "spacing_mm": list(SPACING),
            "qc": {"passed": not qc_failed, "failed": list(qc_failed)}}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as run_batch leaves it: a plain stack, a flagged stack whose QC failed, a plain cine, a
    case whose segmentation file is gone, and an error; listed in an order unlike the review order."""
    data, out = tmp_path / "data", tmp_path / "run"
    image, labels = synthetic_heart(shape=(48, 40, 6))
    uncertainty = np.random.default_rng(0).random(labels.shape).astype(np.float32)
    save_nifti(data / "plain.nii.gz", image, SPACING)
    save_nifti(out / "plain_seg.nii.gz", labels, SPACING, dtype=np.uint8)
    save_nifti(out / "plain_uncertainty.nii.gz", uncertainty, SPACING)
    save_nifti(data / "odd.nii.gz", image[::-1], SPACING)
    save_nifti(out / "odd_seg.nii.gz", np.zeros_like(labels), SPACING, dtype=np.uint8)
    save_nifti(out / "odd_uncertainty.nii.gz", uncertainty, SPACING)
    cine = np.stack([image] * 3, axis=-1)
    save_nifti(data / "cine.nii.gz", cine, SPACING)
    save_nifti(out / "cine_seg.nii.gz", np.stack([labels] * 3, axis=-1), SPACING, dtype=np.uint8)
    save_nifti(data / "lost.nii.gz", image, SPACING)
    records = [
        _ok(data / "plain.nii.gz", out / "plain_seg.nii.gz", out / "plain_uncertainty.nii.gz", 0.55, False),
        _ok(data / "cine.nii.gz", out / "cine_seg.nii.gz", None, 0.75, False,
            measurements={"lv_volume_ml": [80.0, 50.0, 70.0], "myo_mass_g": [60.0, 61.0, 62.0]}, shape=cine.shape),
        {"image": str(data / "broken.nii.gz"), "status": "error", "error": "cannot be read <script>alert(1)</script>",
         "outputs": {}, "measurements": None},
        _ok(data / "odd.nii.gz", out / "odd_seg.nii.gz", out / "odd_uncertainty.nii.gz", None, True,
            qc_failed=["no LV <on any> slice & no RV"]),
        _ok(data / "lost.nii.gz", out / "lost_seg.nii.gz", None, 0.85, False),
    ]
    records[3]["qc"]["failure_probability"] = 0.934
    (out / "cases.json").write_text(json.dumps(records))
    return out


def _scorer():
    """A real scorer whose reference distribution and threshold are set as a calibration would leave them."""
    scorer = OODScorer([SoftmaxScore(kind="entropy")], default="entropy_fg", uncertainty_map="entropy")
    scorer.validation_scores = {"entropy_fg": list(VALIDATION)}
    scorer.thresholds = {"entropy_fg": 0.9}
    return scorer


def _sections(page):
    return re.findall(r"<section class='case g\d' id='case-(\d+)'>", page)


def test_review_order_puts_errors_flagged_and_qc_failures_first_then_worst_score():
    records = [
        {"status": "ok", "default_score": 0.2, "qc": {"passed": True}},
        {"status": "ok", "default_score": 0.1, "qc": {"passed": False}},
        {"status": "error"},
        {"status": "ok", "default_score": 0.9, "qc": {"passed": True}},
        {"status": "ok", "default_score": 2.0, "ood_flag": True, "qc": {"passed": True}},
        {"status": "ok", "default_score": None, "ood_flag": True, "qc": {"passed": False}},  # null: no heart (infinite)
    ]
    assert review_order(records) == [2, 5, 4, 1, 3, 0]


def test_representative_slices_name_base_and_apex_from_the_heart_area():
    areas = np.array([0, 90, 80, 60, 40, 20, 5, 0])
    picks = representative_slices(areas)
    assert [label.split()[0] for label, _ in picks] == ["basal", "mid", "apical"]
    assert [i for _, i in picks] == [2, 4, 6] and all(areas[i] > 0 for _, i in picks)
    assert [label.split()[0] for label, _ in representative_slices(areas[::-1])] == ["apical", "mid", "basal"]
    empty = representative_slices(np.zeros(9))
    assert [i for _, i in empty] == [2, 4, 6] and "no heart" in empty[0][0]


def test_report_orders_escapes_links_and_states_problems(run_dir):
    index = write_report(run_dir, scorer=_scorer(), progress=False)
    assert index == run_dir / "report" / "index.html"
    page = index.read_text(encoding="utf-8")
    # error, flagged (QC failed too), then the others by score, worst first
    assert _sections(page) == ["2", "3", "4", "1", "0"]
    # text from the records is escaped, and the page runs no script and fetches nothing
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "no LV &lt;on any&gt; slice &amp; no RV" in page
    assert page.count("probability of a failed segmentation (QC classifier): 93%") == 1
    assert "<td class='num'>93%</td>" in page  # and in the summary table
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r"<img[^>]* src='([^']+)'", page)
    assert len(sources) == 2 * 4  # a case figure and a score figure per segmented case, none for the error
    for src in sources:
        assert "/" not in src and (index.parent / src).is_file() and (index.parent / src).stat().st_size > 1000
    # the missing segmentation is stated in its own entry; the entry is still there, with the image and its score
    lost = page.split("id='case-4'")[1].split("</section>")[0]
    assert "lost_seg.nii.gz" in lost and "file not found" in lost and "percentile 80" in lost
    assert "no heart found" not in lost and "<img" in lost
    # the cine shows its middle frame and a per-frame measurement table
    cine = page.split("id='case-1'")[1].split("</section>")[0]
    assert "frame 1 of 3" in cine and "<th>frame 1</th>" in cine and "<td>50</td>" in cine
    # summary: counts and the threshold of the default detector
    summary = page.split("</section>")[0]
    assert re.search(r"<b>5</b>cases.*<b>4</b>segmented.*<b>1</b>errors.*<b>1</b>flagged as OOD.*<b>1</b>failed QC", summary)
    assert "entropy_fg" in summary and "0.9 (accepts 95%" in summary
    assert leftover_temporaries(run_dir) == []


def test_report_lists_each_subject_once_with_its_function_and_verdict(run_dir):
    records = json.loads((run_dir / "cases.json").read_text())
    function = {"lv_edv_ml": 150.0, "lv_esv_ml": 60.0, "lv_ef_pct": 60.0, "rv_edv_ml": 140.0, "rv_ef_pct": 55.0, "myo_mass_g": 110.0}
    verdict = {"passed": False, "failed": ["ES: flagged as out of distribution (entropy_fg 0.85)"]}
    for i, phase in ((0, "ED"), (4, "ES")):
        records[i].update(subject="s<1>", phase=phase, cardiac_function=function, subject_qc=verdict,
                          group_estimate={"group": "NOR", "probabilities": {"NOR": 0.8, "DCM": 0.2}})
    records[1].update(cardiac_function={**function, "lv_ef_pct": 42.5}, subject_qc={"passed": True, "failed": []})  # a cine
    (run_dir / "cases.json").write_text(json.dumps(records))
    page = write_report(run_dir, progress=False).read_text(encoding="utf-8")
    table = page.split("subjects: cardiac function")[1].split("</table>")[0]
    rows = table.split("<tr>")[2:]
    assert len(rows) == 2  # the pair once (both of its cases linked), then the cine
    assert "s&lt;1&gt;" in rows[0] and "href='#case-0'>ED<" in rows[0] and "href='#case-4'>ES<" in rows[0]
    assert "<td class='num'>60</td>" in rows[0] and "NOR (80%)" in rows[0]
    assert "do not use without review" in rows[0] and "ES: flagged as out of distribution (entropy_fg 0.85)" in rows[0]
    assert "cine" in rows[1] and "<td class='num'>42.5</td>" in rows[1] and "passed" in rows[1]


def test_report_from_the_command_line_without_an_ood_state(run_dir, capsys):
    index = main([str(run_dir)])
    assert index == run_dir / "report" / "index.html" and "report written" in capsys.readouterr().out
    page = index.read_text(encoding="utf-8")
    assert "unknown (no OOD state given)" in page and "percentile" not in page.split("</section>", 1)[1]
    assert "no in-distribution reference" in page and not list(index.parent.glob("*_score.png"))
    with pytest.raises(FileNotFoundError, match="missing_state.pt"):
        main([str(run_dir), "--ood_state", str(run_dir / "missing_state.pt")])


def test_a_folder_without_cases_json_is_refused_with_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "cases.json"))):
        write_report(tmp_path)
    (tmp_path / "cases.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_report(tmp_path)


def test_bundle_config_runs_the_report_after_the_batch(run_dir):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    assert parser["write_report"] is True
    steps = parser["run"]
    assert len(steps) == 2 and "run_batch(" in steps[0] and steps[1].startswith("$write_report(")
    assert "@ood if @score_ood" in steps[1]
    # the report step as configured, on an existing run folder (the batch step is not run here)
    parser.update({"bundle_root": str(BUNDLE), "output_dir": str(run_dir), "score_ood": False, "run": steps[1:],
                   "ood": None})
    [index] = parser.get_parsed_content("run")
    assert Path(index) == run_dir / "report" / "index.html" and Path(index).is_file()
    parser.update({"write_report": False})
    parser.parse(reset=True)
    assert parser.get_parsed_content("run") == [None]


def test_scorer_from_the_bundle_config_holds_the_reference_of_its_default(tmp_path):
    state = BUNDLE / "models" / "ood_state.pt"
    if not state.is_file():
        pytest.skip(f"no fitted OOD state at {state}")
    scorer = scorer_from_config(state)
    assert scorer.default in scorer.thresholds and len(scorer.validation_scores[scorer.default]) >= 2
    with pytest.raises(FileNotFoundError, match="inference config not found"):
        scorer_from_config(state, tmp_path / "nothing.json")
