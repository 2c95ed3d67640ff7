"""report.write and the TXT / PNG / JSON / NIfTI writers, on hand-built Analysis objects."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from analysis_factory import NODULE, make_analysis
from PIL import Image

from dicompipe import report
from dicompipe.errors import ReportError
from dicompipe.report import text
from dicompipe.types import RESEARCH_USE


@pytest.fixture(scope="module")
def figures():
    """The module ``dicompipe.report.figures``, imported when a test runs (it imports matplotlib)."""
    from dicompipe.report import figures
    return figures


@pytest.fixture(scope="module")
def lung():
    return make_analysis()


def test_default_run_folder_contents(tmp_path):
    small = make_analysis(n_z=4, lesion_z=(2,), k=2)
    run = report.write(small, tmp_path)
    assert run.parent == tmp_path
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    expected = {"report.txt", "analysis.json", "slice_scores.png", "probabilities.png",
                "montage.png", f"cam_{small.verdict.label}.nii.gz", "key_01.png", "key_02.png"}
    # no DICOM, Grad-CAM NIfTI of the verdict's class only, no copy of the input DICOM as NIfTI
    assert names == expected
    assert "No ct.nii.gz" in (run / "report.txt").read_text()
    assert [p.name for p in tmp_path.iterdir()] == [run.name]   # no staging left behind


def test_cam_nifti_all_classes_stored_as_scaled_uint8(tmp_path, lung):
    import nibabel as nib
    run = report.write(lung, tmp_path, formats="nifti", cam_nifti="all")
    assert {p.name for p in run.glob("cam_*.nii.gz")} == {f"cam_{lb}.nii.gz" for lb in lung.cams.labels}
    for lb in lung.cams.labels:
        img = nib.load(run / f"cam_{lb}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        stored = np.asarray(img.dataobj)                                 # scaled on read
        ref = np.transpose(sitk.GetArrayFromImage(lung.cams.volumes[lb]), (2, 1, 0))
        assert np.abs(stored - ref).max() <= ref.max() / 255 * 0.51 + 1e-6     # half a step
    with pytest.raises(ReportError, match="cam_nifti"):
        report.write(lung, tmp_path, cam_nifti="some")


def test_runs_never_overwrite(tmp_path, lung):
    a = report.write(lung, tmp_path, formats="json")
    b = report.write(lung, tmp_path, formats="json")
    assert a != b and a.exists() and b.exists()
    assert len(list(tmp_path.iterdir())) == 2


def test_report_txt_content(figures, lung):
    t = text.render(lung)
    assert RESEARCH_USE in t
    assert lung.model["sha256"] in t and lung.model["version"] in t
    assert "MALIGNANT" in t
    assert "Uncertain band [0.40, 0.60]: a top probability at or below 0.60" in t
    # issue 13: confidence status, measured performance, evidence class, OOD availability
    assert "Confidence status:    model not validated on this kind of input" in t
    assert "Measured performance (the bundle's card):" in t and "not measured" in t
    assert "Key slices (decided the verdict): evidence for malignant" in t
    assert "Out-of-distribution:  not available: the bundle has no OOD model" in t
    assert "ECE per input kind: not recorded in the bundle (this input: HU DICOM)" in t
    for lab, p in lung.verdict.probabilities.items():
        assert f"{lab:<12}{p:6.3f}" in t
    for k in lung.verdict.key_slices:
        assert k.sop_instance_uids[0] in t
        assert f" {k.instance_numbers[0]:>8} " in t
    # the key-slice table's columns line up under a long class name ("P(malignant)")
    lines = t.splitlines()
    head = next(i for i, l in enumerate(lines) if "P(malignant)" in l and "SOPInstanceUID" in l)
    first = lines[head + 1]
    assert lines[head].index("SOPInstanceUID") == first.index(lung.verdict.key_slices[0].sop_instance_uids[0])
    assert lines[head].index("P(malignant)") + len("P(malignant)") == first.index(
        f"{lung.verdict.key_slices[0].probability:.3f}") + len(f"{lung.verdict.key_slices[0].probability:.3f}")
    assert "7 of 8 model slices analysed, 1 skipped" in t
    assert "skipped 1: no lung in slice (synthetic)" in t
    assert "volume: synthetic test data" in t and "predict" in t
    assert "SYNTH001" not in t and "Synthetic^Phantom" not in t
    assert "SYNTH001" in text.render(lung, include_phi=True)
    assert "Images shown at:      window L -600/W 1500 HU" in t
    assert figures.display_window(make_analysis(organ="pancreas", n_z=2, skip=())) == (40, 400)


def test_analysis_json_schema_and_phi(tmp_path, lung):
    run = report.write(lung, tmp_path, formats=["json"])
    d = json.loads((run / "analysis.json").read_text())
    assert d["schema_version"] == lung.SCHEMA_VERSION
    assert d["verdict"]["label"] == "malignant"
    assert d["verdict"]["probabilities"] == pytest.approx(lung.verdict.probabilities)
    assert {"series", "slices", "warnings", "model"} <= set(d)
    assert d["inference"] == {"backend": "test"}        # which runtime produced the numbers
    assert d["report"]["files"] == ["analysis.json"]
    assert "patient_id" not in d["series"]
    run2 = report.write(lung, tmp_path, formats=["json"], include_phi=True)
    assert json.loads((run2 / "analysis.json").read_text())["series"]["patient_id"] == "SYNTH001"
    assert lung.include_phi is False                   # the Analysis itself is not changed


def test_key_slice_legend_says_what_ranked_it(lung):
    import copy

    from dicompipe.report.slice_images import rank_note
    key = lung.verdict.key_slices[0]
    assert rank_note(lung.verdict, key) == "Ranked by P(malignant)"
    v = copy.deepcopy(lung.verdict)
    v.region, v.key_slices[0].in_region = "lung fields (widened by 16 mm)", 0.966
    assert rank_note(v, v.key_slices[0]) == "Ranked by its Grad-CAM in the lung fields (97 % of it there)"


def test_key_png_is_annotated_and_cam_scale_is_volume_wide(figures, tmp_path, lung):
    from dicompipe.report import slice_images
    path = figures.save_rgb(slice_images.key_slice_image(lung, lung.verdict.key_slices[0]),
                            tmp_path / "key.png")
    img = Image.open(path)
    assert img.mode in ("RGB", "RGBA") and img.width > 500 and img.height > 500
    rgb = np.asarray(img.convert("RGB")).astype(int)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 60).any()        # a colour overlay is drawn
    views = [figures.slice_view(lung, s.row) for s in lung.batch.included]
    peaks = [float(v.cam.max()) for v in views]
    assert max(peaks) == pytest.approx(1.0, abs=0.02)             # 1.0 = volume maximum
    assert min(peaks) < 0.5                                       # weak slices stay weak
    v = figures.slice_view(lung, lung.verdict.key_slices[0].row)
    y, x = np.unravel_index(np.argmax(v.cam), v.cam.shape)
    ny, nx = v.cam.shape
    assert abs(y / ny - NODULE[0]) < 0.15 and abs(x / nx - NODULE[1]) < 0.15
    assert v.edges == {"left": "R", "right": "L", "top": "A", "bottom": "P"}


def test_cam_fallback_to_maps_when_no_cam_volumes(figures, tmp_path):
    a = make_analysis(cam_volumes=False)
    v = figures.slice_view(a, a.verdict.key_slices[0].row)
    assert v.cam.shape == v.ct.shape and v.cam.max() > 0.5
    run = report.write(a, tmp_path, formats="nifti")
    assert (run / f"cam_{a.verdict.label}.nii.gz").exists()


def test_all_slices_and_no_cam(figures, tmp_path):
    a = make_analysis(n_z=3, skip=(), lesion_z=(1,), k=1)
    run = report.write(a, tmp_path, formats="png", cam_slices="all")
    assert len(list((run / "slices").glob("slice_z*.png"))) == len(a.batch.included) == 3
    assert {p.name for p in run.glob("*.png")} == {"slice_scores.png", "probabilities.png",
                                                   "key_01.png", "montage.png"}
    b = make_analysis(with_cams=False)
    run = report.write(b, tmp_path, formats="txt,nifti", ct_nifti=True)
    assert not list(run.glob("cam_*.nii.gz")) and (run / "ct.nii.gz").exists()
    assert "No Grad-CAM" in (run / "report.txt").read_text()
    assert figures.slice_view(b, 0).cam is None
    from dicompipe.report import slice_images
    rgb = slice_images.slice_image(b, 0).astype(int)
    panels = rgb[90:590, :1100]                  # both slice panels, no colour bar
    assert rgb.shape[2] == 3 and np.ptp(panels, axis=2).max() == 0     # grey: no overlay


def test_nifti_geometry_matches_volume(tmp_path, lung):
    import nibabel as nib
    run = report.write(lung, tmp_path, formats="nifti", ct_nifti=True)
    ct, cam = nib.load(run / "ct.nii.gz"), nib.load(run / "cam_malignant.nii.gz")
    x, y, z = lung.volume.image.GetSize()
    assert ct.shape == cam.shape == (x, y, z)
    assert np.allclose(ct.affine, cam.affine)


def test_ct_nifti_by_default_only_for_image_input(tmp_path):
    import nibabel as nib
    png = report.write(make_analysis(n_z=4, lesion_z=(2,), k=2, windowed=True), tmp_path, formats="nifti")
    assert nib.load(png / "ct.nii.gz").get_data_dtype() == np.uint8          # 8-bit slices
    dicom = make_analysis(n_z=4, lesion_z=(2,), k=2)
    assert not (report.write(dicom, tmp_path, formats="nifti") / "ct.nii.gz").exists()
    ct = nib.load(report.write(dicom, tmp_path, formats="nifti", ct_nifti=True) / "ct.nii.gz")
    assert ct.get_data_dtype() == np.int16                                    # HU


def test_windowed_png_input(figures, tmp_path):
    a = make_analysis(windowed=True)
    run = report.write(a, tmp_path, formats="txt,json")
    assert "8-bit windowed input" in (run / "report.txt").read_text()
    v = figures.slice_view(a, 0)
    assert v.ct.max() <= 1 and v.ct.max() > 0.5          # 0..255 shown as is, not re-windowed
    with pytest.raises(ReportError, match="need a DICOM source series"):
        report.write(a, tmp_path / "d", formats="dicom")
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_bad_formats_and_unwritable_out(tmp_path, lung):
    with pytest.raises(ReportError, match="Unknown report format 'pdf'"):
        report.write(lung, tmp_path, formats="txt,pdf")
    with pytest.raises(ReportError, match="cam_slices"):
        report.write(lung, tmp_path, cam_slices="some")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ReportError, match="Cannot write the report folder under .*afile"):
        report.write(lung, blocker / "runs")
    assert blocker.read_text() == "x"


def test_failure_midway_leaves_nothing(figures, tmp_path, lung, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(figures, "save", boom)
    with pytest.raises(ReportError, match="No space left"):
        report.write(lung, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_parse_formats():
    assert report.parse_formats(None) == ["txt", "png", "json", "nifti"]
    assert report.parse_formats("json, dicom") == ["json", "dicom"]
    assert report.parse_formats("all") == list(report.FORMATS)


def test_figures_build_without_pyplot(figures, lung):
    for fig in (figures.slice_scores_figure(lung), figures.probability_figure(lung)):
        rgb = figures.to_rgb(fig)
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


def test_cli_unwritable_report_folder_is_recorded_as_failed(tmp_path, monkeypatch, capsys):
    import dicompipe.pipeline
    from dicompipe import history
    from dicompipe.cli import main as cli_main

    a = make_analysis(n_z=3, skip=(), lesion_z=(1,), k=1)
    monkeypatch.setattr(dicompipe.pipeline, "analyze", lambda *args, **kw: a)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    db = tmp_path / "h.sqlite"
    rc = cli_main(["analyze", "in", "--out", str(blocker / "runs"), "--history", str(db),
                   "--quiet", "--format", "json"])
    assert rc == 2
    assert "Cannot write the report folder" in capsys.readouterr().err
    (rec,) = history.list_records(db)
    assert rec["status"] == "failed" and "Cannot write the report folder" in rec["reason"]
    assert rec["report_dir"] is None and rec["label"] == a.verdict.label
    rc = cli_main(["analyze", "in", "--out", str(tmp_path / "runs"), "--history", str(db),
                   "--quiet", "--format", "json,txt"])
    assert rc == 0
    done = history.list_records(db, status="done")[0]
    assert (Path(done["report_dir"]) / "analysis.json").exists()
