"""Calibration per input kind (issue 13): ECE recorded per kind in metadata, "not measured"
where data do not allow, and report.txt saying what the temperature was fitted on."""
import numpy as np
import pytest
from analysis_factory import make_analysis

from dicompipe.model.calibration import INPUT_KINDS, input_kind
from dicompipe.report import text
from dicompipe.train.calibration import calibration_entry, ece_by_kind


def test_ece_by_kind_and_entry():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), y] += 2.0
    e = ece_by_kind({"8-bit slices": (logits, y), "HU DICOM": None}, temperature=1.3)
    assert set(e) == set(INPUT_KINDS)
    assert isinstance(e["8-bit slices"], float) and 0 <= e["8-bit slices"] < 1
    assert e["HU DICOM"].startswith("not measured")
    c = calibration_entry(1.3, "temperature scaling on the validation part (NLL)",
                          fitted_on="validation part, 8-bit JPG slices", ece=e)
    assert c["temperature"] == 1.3 and c["fitted_on"].startswith("validation part")
    assert c["ece"]["8-bit slices"] == pytest.approx(e["8-bit slices"])
    assert calibration_entry(1.0, "none", fitted_on="-")["ece"] == {
        "8-bit slices": "not measured", "HU DICOM": "not measured"}
    assert input_kind(True) == "8-bit slices" and input_kind(False) == "HU DICOM"


def test_report_says_what_calibration_was_fitted_on():
    a = make_analysis()
    a.model["calibration"] = calibration_entry(
        1.5, "temperature scaling", fitted_on="iq-othnccd validation part, 8-bit JPG slices",
        ece={"8-bit slices": 0.041, "HU DICOM": "not measured: no labelled HU DICOM validation data"})
    t = text.render(a)
    assert "fitted on: iq-othnccd validation part, 8-bit JPG slices" in t
    assert "ECE on 8-bit slices: 0.041" in t
    assert "ECE on HU DICOM: not measured: no labelled HU DICOM validation data   <- this input" in t
