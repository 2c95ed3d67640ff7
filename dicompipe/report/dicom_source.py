"""The source DICOM context that the SR and Secondary Capture objects belong to.

Results returned to a PACS must sit in the source study and reference the source images by
UID. Real exports sometimes have those UIDs blanked in the data sets (the abdomen example:
Study/Series/SOP Instance UID and SOP Class UID empty, the file meta intact). Then:

- SOPInstanceUID / SOPClassUID come from the file meta (MediaStorageSOP*UID) — the
  original values, just stripped from the data set;
- a missing SeriesInstanceUID or StudyInstanceUID is generated *deterministically* from the
  FrameOfReferenceUID and study facts, so every run on the same export gives the same UIDs
  and the SR and SC of one run share one study.

Each substitution is reported in ``SourceContext.notes`` (written to report.txt and
analysis.json). The source files are only read, never modified.

Example::

    >>> ctx = source_context(analysis)
    >>> ctx.study_uid, len(ctx.key_images), ctx.notes
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicompipe.errors import ReportError
from dicompipe.types import Analysis, KeySlice

#: Patient and study attributes copied into derived objects (SR, SC) from the source.
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                 "ReferringPhysicianName")


@dataclass
class KeyImage:
    """A key slice and the (header-only, UID-completed) source data set behind it."""

    key: KeySlice
    rank: int
    dataset: Dataset
    frame: int | None = None          # 1-based frame number in a multi-frame source


@dataclass
class SourceContext:
    """UIDs and data sets the DICOM writers need; ``notes`` say what had to be filled in."""

    study_uid: str
    series_uid: str
    key_images: list[KeyImage]
    notes: list[str] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.key_images[0].dataset


def _read(path: str) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same to the user
        raise ReportError(
            f"Cannot re-read source DICOM file {path} for the SR/SC references ({e}). Make "
            "sure the input is still in place, or drop 'dicom' from --format.") from e


def source_context(analysis: Analysis) -> SourceContext:
    """Read the key slices' source headers and complete any missing UIDs (see module doc).

    Raises :class:`ReportError` when the input is not DICOM or has no key slices.
    """
    s = analysis.series
    if s.kind != "dicom":
        raise ReportError(
            f"DICOM SR/Secondary Capture need a DICOM source series, but {analysis.input} was "
            f"read as {s.kind!r} (no study to return results to). Drop 'dicom' from --format, "
            "or analyse the original DICOM export.")
    keys = analysis.verdict.key_slices
    if not keys:
        raise ReportError("The verdict has no key slices, so there is nothing for the DICOM SR "
                          "to reference. Drop 'dicom' from --format.")
    notes: list[str] = []
    images: list[KeyImage] = []
    for rank, k in enumerate(keys, 1):
        ms = next((m for m in analysis.batch.slices if m.row == k.row), None)
        frames = [r.frame for r in ms.sources] if ms is not None else [None] * len(k.files)
        for f, frame in zip(k.files, frames):
            images.append(KeyImage(key=k, rank=rank, dataset=_read(f),
                                   frame=None if frame is None else frame + 1))
    if not images:
        raise ReportError("The key slices name no source files; cannot reference them in DICOM.")

    filled_sop = []
    for im in images:
        ds, meta = im.dataset, im.dataset.get("file_meta", Dataset())
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = meta.get("MediaStorageSOPClassUID") or pydicom.uid.CTImageStorage
        if not ds.get("SOPInstanceUID"):
            uid = meta.get("MediaStorageSOPInstanceUID")
            if not uid:
                uid = generate_uid(entropy_srcs=["dicompipe-sop", str(ds.filename)])
            ds.SOPInstanceUID = uid
            filled_sop.append(str(ds.filename))
    if filled_sop:
        notes.append(f"SOPInstanceUID/SOPClassUID were empty in {len(filled_sop)} source data "
                     "set(s); the file meta's MediaStorageSOPInstanceUID/ClassUID were used.")

    ds0 = images[0].dataset
    anchor = str(ds0.get("FrameOfReferenceUID") or s.frame_of_reference_uid or analysis.input)
    series_uid = str(ds0.get("SeriesInstanceUID") or s.series_instance_uid or "")
    if not series_uid:
        series_uid = generate_uid(entropy_srcs=["dicompipe-series", anchor,
                                                str(ds0.get("SeriesNumber", "")),
                                                str(ds0.get("SeriesDescription", ""))])
        notes.append(f"SeriesInstanceUID was empty in the source; generated {series_uid} "
                     "(deterministic from FrameOfReferenceUID) for the references.")
    study_uid = str(ds0.get("StudyInstanceUID") or s.study_instance_uid or "")
    if not study_uid:
        study_uid = generate_uid(entropy_srcs=["dicompipe-study", anchor,
                                               str(ds0.get("StudyDate", "")),
                                               str(ds0.get("StudyTime", "")),
                                               str(ds0.get("AccessionNumber", ""))])
        notes.append(f"StudyInstanceUID was empty in the source; generated {study_uid} "
                     "(deterministic from FrameOfReferenceUID and study date). The SR/SC "
                     "cannot join the original study in a PACS; they form their own study.")
    for im in images:
        im.dataset.StudyInstanceUID = study_uid
        im.dataset.SeriesInstanceUID = series_uid
        if not im.dataset.get("Modality"):
            im.dataset.Modality = s.modality or "CT"
    return SourceContext(study_uid=study_uid, series_uid=series_uid, key_images=images,
                         notes=notes)


def patient_study(ds: Dataset) -> dict:
    """Patient/study attributes of ``ds`` as highdicom keyword arguments (empty -> None)."""
    def get(kw):
        v = ds.get(kw)
        return None if v in (None, "") else v
    return dict(patient_id=get("PatientID"), patient_name=get("PatientName"),
                patient_birth_date=get("PatientBirthDate"), patient_sex=get("PatientSex"),
                accession_number=get("AccessionNumber"), study_id=get("StudyID"),
                study_date=get("StudyDate"), study_time=get("StudyTime"),
                referring_physician_name=get("ReferringPhysicianName"))


#: emptied (type 2 in the SR/SC IODs) by :func:`deidentify`
DEID_EMPTY = ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName",
              "StudyID")
#: removed, wherever they occur (sequences included), by :func:`deidentify`
DEID_REMOVE = ("PatientBirthTime", "PatientAge", "PatientWeight", "PatientSize",
               "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
               "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
               "IssuerOfPatientID", "EthnicGroup", "PatientComments", "MilitaryRank",
               "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
               "StationName", "OperatorsName", "PerformingPhysicianName",
               "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
               "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
               "AdditionalPatientHistory", "StudyDescription", "DeviceSerialNumber",
               "RequestAttributesSequence", "PersonName")


def deidentify(ds: Dataset, study_uid: str | None = None) -> Dataset:
    """De-identify a derived object (SR, SC) in place for ``--deidentify`` and return it.

    PatientName becomes ``ANONYMOUS``; PatientID ``ANON-`` + 12 hex digits of a hash of the
    StudyInstanceUID (stable per study, not derived from the real ID); birth date, sex,
    accession number, referring physician and study ID are emptied; institution, operators,
    other physicians, addresses and other patient attributes are removed wherever they
    occur. UIDs (so the SR still references the source images) and study dates are kept.
    ``PatientIdentityRemoved`` is ``YES`` and ``DeidentificationMethod`` says the above.

    Example::

        >>> sr = deidentify(pydicom.dcmread("sr.dcm"))
        >>> sr.PatientName, sr.PatientIdentityRemoved
        ('ANONYMOUS', 'YES')
    """
    import hashlib

    def scrub(d: Dataset):
        for kw in DEID_REMOVE:
            if kw in d:
                del d[kw]
        for kw in DEID_EMPTY:
            if kw in d:
                d[kw].value = ""
        for kw in ("PatientName", "PatientID"):
            if kw in d:
                d[kw].value = "ANONYMOUS" if kw == "PatientName" else pid
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    scrub(item)

    uid = str(study_uid or ds.get("StudyInstanceUID") or "")
    pid = "ANON-" + hashlib.sha256(uid.encode()).hexdigest()[:12]
    scrub(ds)
    ds.PatientName, ds.PatientID = "ANONYMOUS", pid
    ds.PatientIdentityRemoved = "YES"
    # LO is at most 64 characters a value; the attribute takes several (VM 1-n)
    ds.DeidentificationMethod = ["dicompipe --deidentify: name/ID replaced",
                                 "birth date, sex, accession, physicians, institution removed",
                                 "UIDs and dates kept"]
    return ds
