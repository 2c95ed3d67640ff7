"""DICOM outputs: TID 1500 Comprehensive 3D SR and the Secondary Capture series.

Both are re-read with pydicom; when dicom3tools' ``dciodvfy`` is installed they must
validate without errors (the test skips that part otherwise).
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from analysis_factory import make_analysis
from synth import tree_hash

from dicompipe import report
from dicompipe.report import dicom_sr

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _items(ds):
    """Every content item of an SR, depth first."""
    for it in ds.get("ContentSequence", []):
        yield it
        yield from _items(it)


def _name(it):
    return it.ConceptNameCodeSequence[0].CodeMeaning


def _dciodvfy_errors(path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dicom")
    a = make_analysis(base / "src")
    before = tree_hash(base / "src")
    run_dir = report.write(a, base / "out", formats="dicom,txt")
    assert tree_hash(base / "src") == before                 # the input is never modified
    return a, run_dir


def test_sr_content(run):
    a, run_dir = run
    sr = pydicom.dcmread(run_dir / "sr.dcm")
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.SeriesDescription.startswith("NOT FOR CLINICAL USE")
    assert sr.StudyInstanceUID == a.series.study_instance_uid
    assert sr.PatientID == "SYNTH001"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    items = list(_items(sr))
    findings = [it for it in items if it.ValueType == "CODE" and _name(it) == "Finding"]
    assert findings[0].ConceptCodeSequence[0].CodeValue == "21594007"          # Malignant
    probs = [float(it.MeasuredValueSequence[0].NumericValue) for it in items
             if it.ValueType == "NUM" and _name(it) == "Probability"]
    assert probs[0] == pytest.approx(a.verdict.probabilities["malignant"], abs=1e-5)
    assert sorted(probs[1:]) == pytest.approx(sorted(a.verdict.probabilities.values()), abs=1e-5)
    cancer = [it for it in items if it.ValueType == "NUM" and _name(it) == "Probability of cancer"]
    assert float(cancer[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        a.verdict.probabilities["malignant"], abs=1e-5)
    algo = [it.TextValue for it in items if it.ValueType == "TEXT" and _name(it) == "Algorithm Name"]
    assert a.model["name"] in algo
    # references to the source series and every key image
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == a.series.study_instance_uid
    series = ev.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == a.series.series_instance_uid
    refd = {r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence}
    assert refd == {k.sop_instance_uids[0] for k in a.verdict.key_slices}
    images = {it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for it in items
              if it.ValueType == "IMAGE"}
    assert refd <= images


def test_sr_records_how_the_key_slices_were_ranked(run):
    a, _ = run
    params = lambda an: [it.TextValue for it in _items(dicom_sr.build(an))          # noqa: E731
                         if it.ValueType == "TEXT" and _name(it) == "Algorithm Parameters"]
    assert a.verdict.region is None and not any(p.startswith("key_slices=") for p in params(a))
    ranked = dataclasses.replace(a, verdict=dataclasses.replace(a.verdict, region="lung fields (...)"))
    assert "key_slices=gradcam_mass_in_lung_fields" in params(ranked)


def test_sc_series(run):
    a, run_dir = run
    files = sorted((run_dir / "sc").glob("*.dcm"))
    assert len(files) == len(a.verdict.key_slices)
    series = set()
    for i, f in enumerate(files, 1):
        sc = pydicom.dcmread(f)
        assert sc.SOPClassUID == SECONDARY_CAPTURE
        assert sc.SeriesDescription.startswith("NOT FOR CLINICAL USE")
        assert sc.StudyInstanceUID == a.series.study_instance_uid
        assert sc.InstanceNumber == i and sc.BurnedInAnnotation == "YES"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == \
            a.verdict.key_slices[i - 1].sop_instance_uids[0]
        px = sc.pixel_array
        assert px.ndim == 3 and px.shape[2] == 3 and px.dtype == np.uint8
        series.add(sc.SeriesInstanceUID)
    assert len(series) == 1 and a.series.series_instance_uid not in series


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_dciodvfy_has_no_errors(run):
    _, run_dir = run
    assert _dciodvfy_errors(run_dir / "sr.dcm") == []
    for f in sorted((run_dir / "sc").glob("*.dcm")):
        assert _dciodvfy_errors(f) == []


def test_deidentified_objects_are_valid_dicom(tmp_path):
    """--deidentify (what dicompipe pull --push and listen --forward may send) stays valid:
    DeidentificationMethod is LO, at most 64 characters a value."""
    a = make_analysis(tmp_path / "src")
    run_dir = report.write(a, tmp_path / "out", formats="dicom", deidentify=True)
    files = [run_dir / "sr.dcm", *sorted((run_dir / "sc").glob("*.dcm"))]
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.PatientIdentityRemoved == "YES"
        assert all(len(v) <= 64 for v in ds.DeidentificationMethod)
        if shutil.which("dciodvfy"):
            assert _dciodvfy_errors(f) == [], f.name


def test_empty_source_uids_are_completed_deterministically(tmp_path):
    a = make_analysis(tmp_path / "src", organ="pancreas", empty_uids=True)
    r1 = report.write(a, tmp_path / "out", formats="dicom,txt")
    r2 = report.write(a, tmp_path / "out", formats="dicom")
    sr1, sr2 = (pydicom.dcmread(r / "sr.dcm") for r in (r1, r2))
    sc = pydicom.dcmread(sorted((r1 / "sc").glob("*.dcm"))[0])
    assert sr1.StudyInstanceUID and sr1.StudyInstanceUID == sr2.StudyInstanceUID
    assert sc.StudyInstanceUID == sr1.StudyInstanceUID
    key_files = [k.files[0] for k in a.verdict.key_slices]
    meta_uids = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
                 for f in key_files}
    series = sr1.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence} == meta_uids
    finding = [it for it in _items(sr1) if it.ValueType == "CODE" and _name(it) == "Finding"]
    assert finding[0].ConceptCodeSequence[0].CodeValue == "108369006"          # Neoplasm
    txt = (r1 / "report.txt").read_text()
    assert "StudyInstanceUID was empty in the source; generated" in txt
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(r1 / "sr.dcm") == []


def test_private_class_code_is_declared(tmp_path):
    from dicompipe.report import dicom_sr  # imports highdicom: here, not at collection

    a = make_analysis(tmp_path / "src")
    a.verdict.probabilities = {"normal": 0.1, "benign": 0.1, "ground-glass": 0.8}
    a.verdict.label = "ground-glass"
    sr = dicom_sr.build(a)
    assert dicom_sr.class_code("ground-glass").scheme_designator == dicom_sr.PRIVATE_SCHEME
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == \
        dicom_sr.PRIVATE_SCHEME
    codes = {it.ConceptCodeSequence[0].CodeValue for it in _items(sr) if it.ValueType == "CODE"}
    assert "GROUND-GLASS" in codes
