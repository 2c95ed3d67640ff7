"""Report stage: TXT, annotated PNGs, plots, JSON, NIfTI, DICOM SR and Secondary Capture.

:func:`write` makes a new run folder under ``out_dir`` (never reusing an earlier one). The
files are assembled in a hidden staging folder and the folder is renamed into place at the
end, so a run folder is either complete or absent. The individual writers are public too:
``text``, ``figures``, ``analysis_json``, ``dicom_sr``, ``dicom_sc`` (and ``nifti`` from
the Grad-CAM stage).

Run folder contents (all formats)::

    report.txt  analysis.json  key_01.png ...  montage.png  slice_scores.png
    probabilities.png  ct.nii.gz  cam_<label>.nii.gz ...  sr.dcm  sc/key_01.dcm ...
    slices/slice_z012.png ...   (only with cam_slices="all")

``cam_<label>.nii.gz`` is written for the verdict's classes (its label and the class whose
evidence decided it) unless ``cam_nifti="all"``; maps are stored as uint8 with the NIfTI
scale (scl_slope). ``ct.nii.gz`` (int16 HU; ~0.27 MB a slice compressed, 80 MB for 300) is a
copy of the input, so by default it is written only for PNG/JPG input, which has no CT
volume file of its own; a DICOM series or NIfTI is already one, and the CAM NIfTIs share
its exact geometry (``ct_nifti=True`` writes the copy anyway). The NIfTI files are compressed in a second thread
while the PNGs are drawn (zlib and the map resampling release the GIL).

Example::

    >>> from dicompipe import report
    >>> run_dir = report.write(analysis, "out/")                        # txt, png, json, nifti
    >>> run_dir = report.write(analysis, "out/", formats=["json", "dicom"])
"""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from dicompipe.errors import DicompipeError, ReportError
from dicompipe.report import files as _files
from dicompipe.types import Analysis

FORMATS = ("txt", "png", "json", "nifti", "dicom")
DEFAULT_FORMATS = ("txt", "png", "json", "nifti")
CAM_SLICES = ("key", "all", "none")
CAM_NIFTI = ("verdict", "all")

__all__ = ["write", "FORMATS", "DEFAULT_FORMATS", "parse_formats"]


def parse_formats(formats: str | Iterable[str] | None) -> list[str]:
    """Normalise a format list ("txt,png" or ["txt", "png"]; None = the default set)."""
    if formats is None:
        return list(DEFAULT_FORMATS)
    if isinstance(formats, str):
        formats = formats.split(",")
    out = []
    for f in formats:
        f = f.strip().lower()
        if f == "all":
            out.extend(FORMATS)
        elif f:
            if f not in FORMATS:
                raise ReportError(f"Unknown report format {f!r}: choose from "
                                  f"{', '.join(FORMATS)} (or 'all').")
            out.append(f)
    if not out:
        raise ReportError(f"No report format given: choose from {', '.join(FORMATS)}.")
    return list(dict.fromkeys(out))


def write(analysis: Analysis, out_dir: str | Path, *, formats: str | Iterable[str] | None = None,
          cam_slices: str = "key", include_phi: bool = False, deidentify: bool = False,
          cam_nifti: str = "verdict", ct_nifti: bool | None = None) -> Path:
    """Write the reports of ``analysis`` into a new run folder under ``out_dir``; return it.

    ``formats``: any of txt, png, json, nifti, dicom (default: all but dicom).
    ``cam_slices``: "key" (annotated PNGs of the key slices), "all" (also one per analysed
    slice under ``slices/``) or "none". ``cam_nifti``: "verdict" (Grad-CAM NIfTIs of the
    verdict's classes) or "all" (every class). ``ct_nifti``: write ``ct.nii.gz`` (None: only
    for PNG/JPG input, see above). ``include_phi``: patient identifiers, input paths,
    file names and series descriptions in report.txt and analysis.json (otherwise
    pseudonymised). DICOM outputs carry the source's patient module, which a PACS needs to
    file them with the study, whatever ``include_phi`` says; ``deidentify=True`` writes them
    without it (:func:`dicompipe.report.dicom_source.deidentify`).
    Raises :class:`ReportError` (nothing is left behind) when something cannot be written.
    """
    fmts = parse_formats(formats)
    if cam_slices not in CAM_SLICES:
        raise ReportError(f"cam_slices must be one of {', '.join(CAM_SLICES)}, got {cam_slices!r}.")
    if cam_nifti not in CAM_NIFTI:
        raise ReportError(f"cam_nifti must be one of {', '.join(CAM_NIFTI)}, got {cam_nifti!r}.")
    ctx = None
    if "dicom" in fmts:                      # check the source before writing anything
        from dicompipe.report.dicom_source import source_context
        ctx = source_context(analysis)
    out_dir = Path(out_dir)
    stage = _files.staging_dir(out_dir)
    written: list[str] = []
    notes: list[str] = list(ctx.notes) if ctx else []
    key_rgb: dict[int, object] = {}          # key figures drawn once, reused by the SC
    nifti = None
    try:
        if "nifti" in fmts:
            nifti = _start_nifti(analysis, stage, cam_nifti, ct_nifti)
        if "png" in fmts:
            _write_pngs(analysis, stage, cam_slices, written, key_rgb)
        if nifti is not None:
            names, skipped = nifti.result()
            written += names
            notes += skipped
        if "dicom" in fmts:
            from dicompipe.report import dicom_sc, dicom_sr
            dicom_sr.write(analysis, stage / "sr.dcm", ctx, deidentify=deidentify)
            written.append("sr.dcm")
            for p in dicom_sc.write(analysis, stage / "sc", ctx, images=key_rgb,
                                    deidentify=deidentify):
                written.append(f"sc/{p.name}")
            notes.append("sr.dcm and sc/ are de-identified (--deidentify): patient name and ID "
                         "replaced, birth date, accession, physicians and institution removed; "
                         "UIDs kept." if deidentify else
                         "sr.dcm and sc/ carry the source's patient and study attributes "
                         "(required to file them with the study), whatever --include-phi says; "
                         "use --deidentify to write them without.")
        listing = sorted(written + [n for n, f in (("analysis.json", "json"),
                                                   ("report.txt", "txt")) if f in fmts])
        if "json" in fmts:
            from dicompipe.report import analysis_json
            analysis_json.write(analysis, stage / "analysis.json", include_phi=include_phi,
                                files=listing, notes=notes)
        if "txt" in fmts:
            from dicompipe.report import text
            text.write(analysis, stage / "report.txt", include_phi=include_phi, files=listing,
                       notes=notes)
        stem = _files.run_stem(analysis.organ)
        return _files.publish(stage, out_dir, stem)
    except OSError as e:
        if nifti is not None:
            wait([nifti])
        _files.discard(stage)
        raise ReportError(f"Cannot write the report under {out_dir}: "
                          f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}.") from e
    except BaseException:
        if nifti is not None:
            nifti.cancel()
            wait([nifti])               # the thread may still be writing into the stage
        _files.discard(stage)
        raise


def _write_pngs(analysis: Analysis, stage: Path, cam_slices: str, written: list[str],
                key_rgb: dict) -> None:
    from dicompipe.report import figures, slice_images

    # PNG encoding (zlib) releases the GIL: a worker encodes while the next image is drawn
    pool = ThreadPoolExecutor(1, thread_name_prefix="dicompipe-png")
    saving: list[Future] = []

    def put(fig, name):
        figures.save(fig, stage / name)
        fig.clear()
        written.append(name)

    def put_rgb(rgb, name):
        if len(saving) >= 4:              # a bounded queue: --cam-slices all on 300 slices
            saving[-4].result()
        saving.append(pool.submit(figures.save_rgb, rgb, stage / name))
        written.append(name)

    try:
        keys = analysis.verdict.key_slices if cam_slices != "none" else []
        for i, k in enumerate(keys, 1):
            key_rgb[i] = slice_images.key_slice_image(analysis, k)
            put_rgb(key_rgb[i], f"key_{i:02d}.png")
        if keys:
            put_rgb(slice_images.montage_image(analysis), "montage.png")
        if cam_slices == "all":
            (stage / "slices").mkdir()
            for s in analysis.batch.included:
                put_rgb(slice_images.slice_image(analysis, s.row), f"slices/slice_z{s.z:03d}.png")
        put(figures.slice_scores_figure(analysis), "slice_scores.png")
        put(figures.probability_figure(analysis), "probabilities.png")
    finally:
        pool.shutdown(wait=True)          # nothing may still write into the stage after this
    for f in saving:
        f.result()                        # an OSError of a worker is raised here


def _nifti_labels(analysis: Analysis, which: str) -> list[str]:
    """The classes whose Grad-CAM NIfTI is written: every class, or the verdict's."""
    labels = analysis.cams.labels if analysis.cams is not None else []
    if which == "all":
        return list(labels)
    vd = analysis.verdict
    return [lb for lb in dict.fromkeys([vd.class_label, vd.evidence]) if lb in labels]


def _start_nifti(analysis: Analysis, stage: Path, which: str, ct: bool | None) -> Future:
    """Write the NIfTIs in a worker thread; its result is (files written, notes)."""
    # the CAM maps go onto the CT grid in the worker too: the slice images need single
    # slices only (explain.cam_slice), so both run at once (numpy and zlib release the GIL)
    labels = _nifti_labels(analysis, which)
    pool = ThreadPoolExecutor(1, thread_name_prefix="dicompipe-nifti")
    if ct is None:
        ct = analysis.series.kind not in ("dicom", "nifti")
    future = pool.submit(_write_nifti, analysis, stage, labels, ct)
    pool.shutdown(wait=False)
    return future


def _write_nifti(analysis: Analysis, stage: Path, labels: list[str],
                 ct: bool) -> tuple[list[str], list[str]]:
    import numpy as np

    from dicompipe.report.nifti import write_nifti

    written: list[str] = []
    notes: list[str] = []
    if ct:
        windowed = analysis.volume.windowed
        write_nifti(analysis.volume.image, stage / "ct.nii.gz",
                    description="dicompipe CT (8-bit windowed)" if windowed else "dicompipe CT (HU)",
                    dtype=np.uint8 if windowed else np.int16)
        written.append("ct.nii.gz")
    elif labels:
        what = "DICOM series" if analysis.series.kind == "dicom" else "NIfTI"
        notes.append(f"No ct.nii.gz: the input {what} is the CT, and "
                     "cam_*.nii.gz share its exact geometry (open them over it); --ct-nifti "
                     "writes a copy.")
    cams = analysis.cams
    if cams is None:
        return written, notes
    from dicompipe.explain import cam_volume_uint8
    for label in labels:
        try:
            img, scale = cam_volume_uint8(cams, analysis.batch, label)
        except (DicompipeError, NotImplementedError) as e:
            notes.append(f"cam_{label}.nii.gz skipped: {e}")
            continue
        name = f"cam_{label}.nii.gz"
        write_nifti(img, stage / name, description=f"Grad-CAM {label} (uint8, scaled)",
                    display_range=(0.0, float(cams.scale.get(label) or 0.0)), slope=scale)
        written.append(name)
    return written, notes
