"""DICOM Comprehensive 3D SR measurement report (TID 1500) of a verdict, built with highdicom.

Content tree (Imaging Measurement Report, TID 1500):

- observer: the algorithm as a device (name, version, manufacturer "dicompipe");
- procedure reported: CT (SCT 77477000); image library: the key images;
- one measurement group (TID 1501) for the verdict: finding site (the organ registry's code),
  finding type = the verdict class, coded qualitative evaluation "Finding" = that class,
  measurement "Probability" (calibrated, unit "1"), "Probability of cancer" for a
  malignant class, algorithm identification (name, version, aggregation parameters and,
  when the key slices were ranked inside an organ region, that ranking), and
  references to the key images (source images for the group);
- one group per class with its calibrated probability.

The SR is placed in the source study; the evidence sequence references the source series
and key images. Content qualification is RESEARCH.

Example::

    >>> from dicompipe.report import dicom_sr
    >>> sr = dicom_sr.build(analysis)
    >>> dicom_sr.write(analysis, "out/sr.dcm")
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicompipe import organs
from dicompipe.errors import ReportError
from dicompipe.report.dicom_source import SourceContext, source_context
from dicompipe.types import Analysis
from dicompipe.util import atomic_path

PRIVATE_SCHEME = "99DICOMPIPE"
SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "NOT FOR CLINICAL USE - dicompipe AI measurement report"

UNIT_NONE = Code("1", "UCUM", "no units")
FINDING = Code("121071", "DCM", "Finding")
PROBABILITY = Code("122157", "DCM", "Probability")
PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
CT = Code("77477000", "SCT", "Computed tomography")

#: Class name -> SNOMED CT concept (anything else gets a code in a private scheme).
CLASS_CODES = {
    "normal": Code("17621005", "SCT", "Normal"),
    "benign": Code("30807003", "SCT", "Benign"),
    "malignant": Code("21594007", "SCT", "Malignant"),
    "tumour": Code("108369006", "SCT", "Neoplasm"),
    "tumor": Code("108369006", "SCT", "Neoplasm"),
}
MALIGNANT = {"malignant", "tumour", "tumor"}


def class_code(label: str) -> Code:
    """The coded concept for a class name (SNOMED CT where one fits, else private 99DICOMPIPE)."""
    return CLASS_CODES.get(label.lower()) or Code(label.upper()[:16], PRIVATE_SCHEME, label)


def _private_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name="dicompipe class labels",
        responsible_organization="dicompipe")


def build(analysis: Analysis, ctx: SourceContext | None = None, *,
          series_number: int = SR_SERIES_NUMBER) -> hd.sr.Comprehensive3DSR:
    """The SR object (not yet written). ``ctx`` defaults to :func:`source_context`."""
    from dicompipe._version import __version__

    ctx = ctx or source_context(analysis)
    vd, model = analysis.verdict, analysis.model or {}
    name = str(model.get("name") or "dicompipe-model")
    version = str(model.get("version") or "unknown")
    sha = str(model.get("sha256") or "")
    algo = hd.sr.AlgorithmIdentification(
        name=name, version=version,
        parameters=[f"rule={vd.rule}", f"temperature={vd.temperature:.4g}",
                    f"uncertain_band={vd.uncertain_band[0]:.2f}-{vd.uncertain_band[1]:.2f}"]
        + ([f"sha256={sha[:40]}"] if sha else [])
        + ([f"key_slices=gradcam_mass_in_{vd.region_name.replace(' ', '_')}"[:64]]
           if vd.region else []))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["dicompipe-device", name, version, sha]),
            name=name[:64], manufacturer_name="dicompipe", model_name=name[:64],
            serial_number=version[:64]))
    context = hd.sr.ObservationContext(observer_device_context=device)
    sources = [hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=im.dataset.SOPClassUID,
        referenced_sop_instance_uid=im.dataset.SOPInstanceUID,
        referenced_frame_numbers=[im.frame] if im.frame else None) for im in ctx.key_images]
    organ = organs.find(analysis.organ)
    fs = organ.finding_site if organ else None
    site = Code(fs.value, fs.scheme, fs.meaning) if fs else None
    sites = [hd.sr.FindingSite(anatomic_location=site)] if site else None

    p = vd.probabilities
    measurements = [hd.sr.Measurement(name=PROBABILITY, value=round(float(p[vd.class_label]), 6),
                                      unit=UNIT_NONE, algorithm_id=algo)]
    malignant = [l for l in p if l.lower() in MALIGNANT]
    if malignant:
        measurements.append(hd.sr.Measurement(
            name=PROBABILITY_OF_CANCER, value=round(float(p[malignant[0]]), 6),
            unit=UNIT_NONE, algorithm_id=algo))
    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"volume verdict: {vd.label}"
            + (" (uncertain)" if vd.uncertain and vd.assessable else "")
            + (f" ({vd.reason})" if not vd.assessable else "")),
        finding_type=class_code(vd.label), algorithm_id=algo, finding_sites=sites,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=FINDING,
                                                             value=class_code(vd.label))],
        measurements=measurements, source_images=sources)]
    for label, prob in p.items():
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=f"class probability: {label}"),
            finding_type=class_code(label), algorithm_id=algo, finding_sites=sites,
            measurements=[hd.sr.Measurement(name=PROBABILITY, value=round(float(prob), 6),
                                            unit=UNIT_NONE, algorithm_id=algo)]))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=CT, imaging_measurements=groups,
        referenced_images=[im.dataset for im in ctx.key_images])
    private = any(class_code(l).scheme_designator == PRIVATE_SCHEME for l in [*p, vd.label])
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=[im.dataset for im in ctx.key_images], content=report[0],
            series_instance_uid=generate_uid(), series_number=series_number,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="dicompipe",
            is_complete=True, is_final=False, is_verified=False,
            series_description=SERIES_DESCRIPTION, content_qualification="RESEARCH",
            software_versions=f"dicompipe {__version__}", manufacturer_model_name=name[:64],
            coding_schemes=[_private_scheme()] if private else None)
    except (ValueError, TypeError, AttributeError) as e:
        raise ReportError(f"Cannot build the DICOM SR for {analysis.input}: {e}") from e


def write(analysis: Analysis, path: str | Path, ctx: SourceContext | None = None, *,
          deidentify: bool = False) -> Path:
    """Build the SR and write it atomically to ``path``; returns ``path``. ``deidentify``:
    without the patient's identifiers (see :func:`dicom_source.deidentify`)."""
    sr = build(analysis, ctx)
    if deidentify:
        from dicompipe.report.dicom_source import deidentify as _deid
        _deid(sr)
    path = Path(path)
    with atomic_path(path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return path
