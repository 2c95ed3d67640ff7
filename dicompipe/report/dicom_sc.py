"""DICOM Secondary Capture series of the key-slice overlays, in the source study.

Each key slice becomes one RGB Secondary Capture image: the annotated PNG rendering
(windowed CT, Grad-CAM overlay, colour bar, hot outline, legend and the research-use
banner burned in). The series description starts "NOT FOR CLINICAL USE" so it stands out
in a PACS; BurnedInAnnotation is YES; content qualification RESEARCH. The images carry the
source's patient/study module (needed to file them with the study) and reference the
source image they were derived from.

Example::

    >>> from dicompipe.report import dicom_sc
    >>> paths = dicom_sc.write(analysis, "out/sc")        # sc/key_01.dcm, ...
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicompipe import organs
from dicompipe.errors import ReportError
from dicompipe.report import figures, slice_images
from dicompipe.report.dicom_source import SourceContext, patient_study, source_context
from dicompipe.types import Analysis
from dicompipe.util import atomic_path

SC_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "NOT FOR CLINICAL USE - dicompipe Grad-CAM key slices"


def _derivation(src: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    return item


def build(analysis: Analysis, ctx: SourceContext | None = None, *, label: str | None = None,
          series_number: int = SC_SERIES_NUMBER,
          images: dict[int, np.ndarray] | None = None) -> list[hd.sc.SCImage]:
    """One SC image per key slice (not yet written). ``label``: CAM class (default verdict).

    ``images``: already rendered key-slice figures as RGB arrays by rank (1-based), e.g.
    the ones written as key_NN.png, so they are not drawn twice.
    """
    from dicompipe._version import __version__

    ctx = ctx or source_context(analysis)
    series_uid = generate_uid()
    label = label or analysis.verdict.evidence
    out, seen = [], set()
    for im in ctx.key_images:
        if im.rank in seen:           # one image per key slice even when it has 2 sources
            continue
        seen.add(im.rank)
        rgb = (images or {}).get(im.rank)
        if rgb is None:
            rgb = slice_images.key_slice_image(analysis, im.key, label)
        edges = figures.edge_letters(analysis.volume.image.GetDirection())
        src = im.dataset
        try:
            sc = hd.sc.SCImage(
                pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
                coordinate_system="PATIENT", patient_orientation=(edges["right"], edges["bottom"]),
                study_instance_uid=ctx.study_uid,
                series_instance_uid=series_uid, series_number=series_number,
                sop_instance_uid=generate_uid(), instance_number=im.rank,
                manufacturer="dicompipe", series_description=SERIES_DESCRIPTION,
                content_qualification="RESEARCH", software_versions=f"dicompipe {__version__}",
                **patient_study(src))
        except (ValueError, TypeError) as e:
            raise ReportError(f"Cannot build the Secondary Capture for key slice {im.rank} of "
                              f"{analysis.input}: {e}") from e
        sc.BurnedInAnnotation = "YES"
        # an unpaired region, so that Laterality (General Series, type 2C) is not expected
        organ = organs.find(analysis.organ)
        sc.BodyPartExamined = organ.body_part if organ else "CHEST"
        sc.ImageComments = (f"Grad-CAM '{label}' on source InstanceNumber "
                            f"{src.get('InstanceNumber', '?')}; verdict {analysis.verdict.label}. "
                            "NOT FOR CLINICAL USE.")[:10240]
        sc.DerivationDescription = "Grad-CAM overlay rendered by dicompipe (research use only)"
        sc.SourceImageSequence = DicomSequence([_derivation(src)])
        out.append(sc)
    return out


def write(analysis: Analysis, folder: str | Path, ctx: SourceContext | None = None, *,
          images: dict[int, np.ndarray] | None = None, deidentify: bool = False) -> list[Path]:
    """Write the SC series as ``folder/key_NN.dcm`` (atomic per file); returns the paths.
    ``deidentify``: without the patient's identifiers (see :func:`dicom_source.deidentify`)."""
    from dicompipe.report.dicom_source import deidentify as _deid
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"Cannot create {folder}: {e.strerror or e}.") from e
    paths = []
    for sc in build(analysis, ctx, images=images):
        if deidentify:
            _deid(sc)
        p = folder / f"key_{int(sc.InstanceNumber):02d}.dcm"
        with atomic_path(p) as tmp:
            sc.save_as(tmp, enforce_file_format=True)
        paths.append(p)
    return paths
