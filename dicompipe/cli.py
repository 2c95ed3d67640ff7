"""The ``dicompipe`` command. Research use only.

Examples::

    dicompipe series study/ --json
    dicompipe analyze study/ --organ lung --out runs/
    dicompipe batch cohort/ --organ lung --out cohort-out --workers 2
    dicompipe history list --since 2026-01-01

Each subcommand is a thin wrapper over a library function; errors from the
``DicompipeError`` family print one clear message and exit 2 (traceback with --debug).
"""
from __future__ import annotations

import argparse
import os
import sys

from dicompipe import organs
from dicompipe.errors import DicompipeError
from dicompipe.types import RESEARCH_USE

# the same names as dicompipe.model.backends.BACKENDS (not imported: that pulls in torch)
BACKENDS = ["auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8"]


def _p_series(sub):
    p = sub.add_parser("series", help="list the series found under PATH and which one would be analysed",
                       description="Discover DICOM series (folder, zip, DICOMDIR, file), PNG/JPG slices "
                                   "or NIfTI under PATH; show which series would be chosen and why the "
                                   "others were not. Reads headers only; never writes to PATH.")
    p.add_argument("path", help="a folder, a .zip of one, a DICOM file, an image folder or a NIfTI file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--series", help="force a series by SeriesInstanceUID, series number or key")
    p.add_argument("--include-phi", action="store_true", help="also show patient name/ID")
    p.set_defaults(func=_cmd_series)


def _cmd_series(args) -> int:
    import json

    from dicompipe import io
    from dicompipe.errors import NoSeriesFound

    found = io.discover(args.path)
    chosen, error = None, None
    try:
        chosen = io.select(found, series=args.series)
    except NoSeriesFound as e:
        error = e
    if args.json:
        print(json.dumps({
            "source": str(args.path), "chosen": chosen.key if chosen else None,
            "error": str(error) if error else None,
            "skipped": {"not_dicom": found.skipped.other_files,
                        "documents": found.skipped.documents,
                        "unreadable": [{"file": f, "why": w} for f, w in found.skipped.unreadable]},
            "series": [s.to_dict(include_phi=args.include_phi) for s in found],
        }, indent=2))
        return 2 if error else 0
    head = f"{'':1} {'key':<10} {'mod':<6} {'n':>5} {'matrix':>9} {'pixel mm':>11} {'step mm':>8} " \
           f"{'orient':<9} {'tilt':>5}  description"
    print(head)
    for s in found:
        ps = f"{s.pixel_spacing[1]:.3f}x{s.pixel_spacing[0]:.3f}" if s.pixel_spacing else "-"
        step = f"{s.spacing_stats['median']:.3f}" if s.spacing_stats else "-"
        matrix = f"{s.columns}x{s.rows}" if s.rows else "-"
        tilt = f"{s.gantry_tilt:.1f}" if s.gantry_tilt else "0"
        who = ""
        if args.include_phi and s.patient_id:
            who = f"  [{s.patient_name or ''} {s.patient_id} {s.study_date or ''}]"
        print(f"{'*' if s is chosen else ' ':1} {s.key:<10} {(s.modality or s.kind)[:6]:<6} "
              f"{s.n_instances:>5} {matrix:>9} {ps:>11} {step:>8} {s.orientation or '-':<9} {tilt:>5}  "
              f"{s.series_description or ''}{who}")
    if found.skipped_summary:
        print(f"skipped: {found.skipped_summary}")
        others = found.skipped.other_files
        for f in others[:5]:
            print(f"  not DICOM: {f}")
        if len(others) > 5:
            print(f"  … and {len(others) - 5} more")
    if found.skipped.documents:
        print("documentation beside the images (not analysed): "
              + ", ".join(os.path.basename(f) for f in found.skipped.documents[:8])
              + (" …" if len(found.skipped.documents) > 8 else ""))
    if chosen is not None:
        print(f"\nchosen: {chosen.key} - {chosen.reason}")
        for w in chosen.warnings:
            print(f"  warning: {w}")
    for s in found:
        if s is not chosen and s.reason:
            print(f"{s.key}: {s.reason}")
    if error:
        raise error
    return 0


def _p_analyze(sub):
    p = sub.add_parser("analyze", help="analyse one CT and write a report folder",
                       description="Analyse one CT (DICOM folder/zip/file, PNG/JPG slices, NIfTI): "
                                   "choose the series, prepare it in HU, classify each slice with "
                                   "the organ's ResNet50, aggregate a calibrated verdict, explain "
                                   "with Grad-CAM and write reports into a new folder under --out. "
                                   + RESEARCH_USE)
    p.add_argument("input", help="the CT to analyse")
    p.add_argument("--organ", choices=[*organs.names(), "auto"], default="auto",
                   help="organ model to use (auto: from headers, else from lung-air content)")
    p.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs)")
    p.add_argument("--series", help="force a series by SeriesInstanceUID, series number or key")
    p.add_argument("--model", help="bundle name or folder (default: the organ's built-in bundle)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="inference backend (auto: on CPU OpenVINO fp32, else ONNX Runtime fp32, "
                        "else torch, whichever is installed; *-int8: only for bundles that ship a "
                        "validated int8 calibration; "
                        "openvino*: pip install dicompipe[openvino]; openvino-bf16: CPUs with "
                        "native bfloat16, reduced precision)")
    p.add_argument("--batch-size", type=int,
                   help="slices per network call (default 16 on a CPU, 64 on a GPU)")
    p.add_argument("--all-slices", action="store_true", help="do not skip slices outside the organ")
    p.add_argument("--cam", dest="cam", action="store_true", default=True, help="Grad-CAM (default)")
    p.add_argument("--no-cam", dest="cam", action="store_false", help="skip Grad-CAM")
    p.add_argument("--cam-slices", choices=["all", "key"], default="key",
                   help="which slices get CAM image files (computation always covers all)")
    p.add_argument("--cam-nifti", choices=["verdict", "all"], default="verdict",
                   help="with --format nifti: Grad-CAM volumes (uint8, scaled) for the verdict's "
                        "classes only (default) or for every class")
    p.add_argument("--ct-nifti", action="store_true", default=None,
                   help="with --format nifti: also write ct.nii.gz for DICOM/NIfTI input (a copy "
                        "of the input, ~80 MB for 300 slices; written by default only for "
                        "PNG/JPG input)")
    p.add_argument("--format", default=None,
                   help="comma list of outputs: txt,png,json,nifti,dicom (default: all but dicom)")
    p.add_argument("--include-phi", action="store_true",
                   help="write patient identifiers, input paths, file names and series "
                        "descriptions into reports, history and output (off by default: "
                        "pseudonymised)")
    p.add_argument("--deidentify", action="store_true",
                   help="with --format dicom: write sr.dcm and sc/ without the patient's name, "
                        "ID, birth date, accession number, physicians and institution "
                        "(default: copied from the source, as a PACS needs)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory the volume may take, e.g. 4G (default: 75%% of the available "
                        "memory); larger inputs are refused before loading")
    p.add_argument("--spacing", type=_spacing, metavar="X,Y,Z",
                   help="pixel and slice spacing in mm of PNG/JPG slices, which carry none "
                        "(default 1,1,1; DICOM and NIfTI headers say it themselves)")
    p.add_argument("--history", help="case-history database file (default: user data dir)")
    p.add_argument("--no-history", action="store_true", help="do not record the case")
    p.add_argument("--config", help="organ settings YAML over the built-in "
                                     "dicompipe/configs/<organ>.yaml (only what it sets)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_analyze)


def _spacing(text: str) -> tuple[float, float, float]:
    """``"0.7,0.7,2.5"`` -> (0.7, 0.7, 2.5); one number means the same on every axis."""
    try:
        v = [float(t) for t in text.split(",")]
    except ValueError:
        v = []
    if len(v) == 1:
        v = v * 3
    if len(v) != 3 or not all(0 < x < 1e4 for x in v):
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y,Z in mm (e.g. 0.7,0.7,2.5)")
    return v[0], v[1], v[2]


def _cmd_analyze(args) -> int:
    from dicompipe.io.limits import parse_size
    from dicompipe.pipeline import run_case

    max_memory = parse_size(args.max_memory) if args.max_memory else None
    bar = None if args.quiet else _ProgressBar()
    try:
        res = run_case(args.input, organ=args.organ, out=args.out, formats=args.format,
                       history=False if args.no_history else args.history, progress=bar,
                       cam_slices=args.cam_slices, cam_nifti=args.cam_nifti,
                       ct_nifti=args.ct_nifti,
                       include_phi=args.include_phi,
                       deidentify=args.deidentify, model=args.model, series=args.series,
                       device=args.device, backend=args.backend, cam=args.cam,
                       select_slices=not args.all_slices, config=args.config,
                       batch_size=args.batch_size, max_memory=max_memory,
                       spacing=args.spacing)
    finally:
        if bar:
            bar.close()
    if res.report_error is not None:        # recorded as failed; nothing left on disk
        raise res.report_error
    if isinstance(res.history_error, DicompipeError):
        e = res.history_error
        raise type(e)(f"{e} The report was written to {res.run_dir} but is not in the "
                      "case history.") from e
    if res.history_error is not None:
        raise res.history_error
    a, run_dir = res.analysis, res.run_dir
    scrub = (lambda t: t) if args.include_phi else _redactor(a).text
    v = a.verdict
    probs = ", ".join(f"{k} {p:.2f}" for k, p in v.probabilities.items())
    if v.assessable:
        print(f"{a.organ}: {v.label.upper()}{' (uncertain)' if v.uncertain else ''}  [{probs}]")
    else:
        print(f"{a.organ}: {v.label.upper()} ({v.reason})  [model output, for transparency "
              f"only: {probs}]")
    from dicompipe.model.confidence import confidence_of, performance_text
    conf = confidence_of(a)
    print(f"confidence: {conf.status}" + (f" ({conf.reasons[0].split(': ', 1)[-1]})"
                                          if conf.reasons else ""))
    print(f"measured performance: {performance_text(conf.performance)}")
    if v.key_slices:
        print(f"key slices: z {', '.join(str(k.z) for k in v.key_slices)} (z from 0; evidence for "
              f"{v.evidence}, ranked by {v.ranked_by})")
    name = (a.series.series_description if args.include_phi else None) or a.series.key
    print(f"series: {name} ({scrub(a.series.reason or '')})")
    for w in a.warnings:
        print(f"warning: {scrub(w)}")
    print(f"report: {run_dir}")
    print(RESEARCH_USE)
    return 0


def _redactor(analysis):
    from dicompipe.phi import Redactor
    return Redactor.for_analysis(analysis)


class _ProgressBar:
    """tqdm bar on stderr fed by run_case()'s progress callback (shown from the first call,
    so checks that fail before the analysis starts print no bar)."""

    def __init__(self):
        self._bar = None

    def __call__(self, stage: str, fraction: float, message: str):
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=100, file=sys.stderr, leave=False,
                             bar_format="{desc:<28}{bar}| {percentage:3.0f}% {elapsed}")
        self._bar.set_description_str(stage)
        self._bar.n = int(100 * fraction)
        self._bar.refresh()

    def close(self):
        if self._bar is not None:
            self._bar.close()


def _p_batch(sub):
    p = sub.add_parser("batch", help="analyse a cohort of studies (one machine or a Dask cluster), resumably",
                       description="Analyse every study under ROOT (each folder, .zip or NIfTI directly "
                                   "under it) or listed in a CSV manifest (columns: path, optional "
                                   "study, organ, series), one Dask task per study, on a local cluster "
                                   "of worker processes or an existing scheduler. Results: "
                                   "OUT/results.csv and .parquet (and results.jsonl, written as each "
                                   "study finishes), run folders under OUT/runs/<study>/, the case "
                                   "history. Run it again to continue: studies whose content already "
                                   "has a result are skipped; failed ones are retried. " + RESEARCH_USE)
    p.add_argument("source", metavar="ROOT|MANIFEST.csv", help="a folder of studies or a CSV manifest")
    _case_args(p, organ_default="auto", out_help="output folder (results table + run folders)",
               organ_help="organ for studies whose manifest row names none (default auto)",
               format_help="comma list of outputs per study: txt,png,json,nifti,dicom (default: "
                           "all but dicom)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="an existing Dask scheduler, e.g. tcp://host:8786 (its workers need "
                            "dicompipe and must see the same paths)")
    where.add_argument("--workers", type=int, metavar="N",
                       help="worker processes of the local cluster (default: min(physical cores, "
                            "available memory / 2.5 GB))")
    p.add_argument("--limit", type=int, metavar="N", help="analyse at most N studies now (the rest next time)")
    p.add_argument("--rehash", action="store_true",
                   help="read every study again to hash it (default: a study whose files' names, "
                        "sizes and times match its finished row is not read again)")
    p.add_argument("--no-dashboard", action="store_true", help="no Dask dashboard for the local cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args) -> int:
    from pathlib import Path

    from dicompipe import batch
    df = batch.run(args.source, out=args.out, organ=args.organ, scheduler=args.scheduler,
                   workers=args.workers, limit=args.limit, rehash=args.rehash,
                   progress=not args.quiet, dashboard=not args.no_dashboard, **_case_kwargs(args))
    c = df.attrs["summary"]
    print(f"{c['studies']} studies: {c['analysed']} analysed, {c['skipped']} already done, "
          f"{c['duplicates']} duplicate(s), {c['errors']} failed"
          + (f", {c['left']} left for a later run" if c["left"] else "")
          + f" ({c['wall_s']:.0f} s, {c['workers']} worker(s))")
    print(f"results: {Path(args.out) / batch.CSV} (+ .parquet), run folders under "
          f"{Path(args.out) / 'runs'}")
    if c["errors"]:
        print("failed studies: see the 'error' column", file=sys.stderr)
    return 1 if c["errors"] else 0


def _p_train(sub):
    p = sub.add_parser("train", help="train a bundle on labelled images or DICOM")
    p.add_argument("data", help="class-folder image tree or CSV manifest")
    p.add_argument("--organ", choices=organs.names(), required=True)
    p.add_argument("--out", help="bundle folder to write (required unless --no-bundle)")
    p.add_argument("--epochs", type=int, help="epochs (default 10: 8 at 128 px, 2 at 224 px)")
    p.add_argument("--sizes", help='image size per epoch, e.g. "128x8,224x2" (overrides --epochs)')
    p.add_argument("--budget-minutes", type=float, help="train on the clock instead of epochs")
    p.add_argument("--low-size", type=int, default=112,
                   help="with --budget-minutes: image size for the first 70%% of the time")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    p.add_argument("--resume", action="store_true", help="continue from the workdir checkpoint")
    p.add_argument("--label-map", help='folder=label pairs, e.g. "Bengin cases=benign"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--bf16", action="store_true",
                   help="train in bfloat16 autocast (weights and optimiser stay float32): "
                        "about 2x the images per second on a CPU with AVX512-BF16 or AMX; "
                        "refused where bf16 would be emulated")
    p.add_argument("--workdir", help="checkpoints, cache and log (default training/<organ>)")
    p.add_argument("--pretrain", choices=["synthetic-lesions"],
                   help="bundles 2.x: synthetic-lesion pretraining with a location loss, then "
                        "fine-tuning on the real labels (see --phases); body-masked input")
    p.add_argument("--phases", default="pretrain:46:128,finetune:32:160",
                   help="with --pretrain: NAME:MINUTES:SIZE,... (pretrain = synthetic lesions "
                        "only; finetune = half real labels, half synthetic; finetune-l4 / "
                        "finetune-head train only layer4 + head / the head); the last size is "
                        "the bundle's input size (default %(default)s)")
    p.add_argument("--split-file", help="with --pretrain: a docs/split.json (relative path -> "
                                        "train/val/test) to use, e.g. the 1.0.0 bundle's")
    p.add_argument("--version", default="2.0.0", help="with --pretrain: the bundle version")
    p.add_argument("--init", help="with --pretrain: start from these safetensors (the head "
                                  "too when its classes match; another organ's lesion "
                                  "network gives the backbone only)")
    p.add_argument("--real-share", type=float, default=0.5,
                   help="with --pretrain: share of each fine-tuning batch that is real labelled "
                        "slices, the rest synthetic lesions with the location loss; 0 = "
                        "synthetic lesions only (default %(default)s)")
    p.add_argument("--cam-weight", type=float, default=3.0,
                   help="with --pretrain: weight of the location loss that ties the class map "
                        "to the synthetic lesion (default %(default)s)")
    p.add_argument("--layer4-dilation", type=int, choices=[1, 2], default=2,
                   help="with --pretrain: 2 = layer4 at stride 16 (dilated), a class map and "
                        "Grad-CAM twice as fine (10 x 10 at 160 px) for ~1.3x the forward time; "
                        "1 = the standard stride 32 (default %(default)s)")
    p.add_argument("--abnormal-top", type=float, default=0.0, metavar="SHARE",
                   help="with --pretrain: each abnormal class's logit is the mean of its "
                        "SHARE most abnormal class-map cells (MIL-style evidence pooling, e.g. "
                        "0.05 = 5 of 10 x 10 cells), so a slice scores by its strongest "
                        "evidence; 0 = the global average (default)")
    p.add_argument("--extra-normals", nargs="+", action="extend", default=[], metavar="SERIES",
                   help="with --pretrain: lesion-free DICOM series whose slices join the "
                        "training part as normal (e.g. an upper-abdomen series: lung bases "
                        "under the diaphragm dome as hard negatives); repeat the option or "
                        "name several series, all are used")
    p.add_argument("--lesion-box", type=float, default=0.2,
                   help="with --pretrain, pancreas: lesions go into soft tissue within this "
                        "half-width (fraction of the body crop) around the centre; 0.45 = "
                        "nearly the whole body, so only their look says where they are "
                        "(default %(default)s: the central abdomen)")
    p.add_argument("--input-region", choices=["lung_fields"],
                   help="with --pretrain, lung: the network sees only the lung fields (widened "
                        "by 5 %% of the image side; everything else background), in training "
                        "and, through the bundle's spec, at inference")
    p.add_argument("--region-dropout", type=float, default=0.0, metavar="P",
                   help="with --pretrain, lung, without --input-region: show this share of the "
                        "training slices through the lung fields only (context dropped at random); "
                        "the bundle still sees the whole body (default 0)")
    p.add_argument("--prepared", metavar="NPZ",
                   help="with --pretrain: the rendered training data in one file, written on "
                        "first use; when it exists DATA is not read (e.g. on a GPU machine "
                        "without the raw data or DICOM readers)")
    p.add_argument("--device", default="cpu",
                   help='with --pretrain: where the network trains, e.g. "cuda" (default cpu)')
    p.add_argument("--workers", type=int, default=0,
                   help="with --pretrain: processes that synthesise lesion batches ahead "
                        "(use most cores with --device cuda; default 0 = in the trainer)")
    p.add_argument("--batch-size", type=int, default=32, help="with --pretrain (default 32)")
    p.add_argument("--no-bundle", action="store_true",
                   help="with --pretrain: stop after training (weights in the workdir); the "
                        "same command without it later writes the bundle")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    if not args.out and not (args.pretrain and args.no_bundle):
        raise DicompipeError("dicompipe train needs --out (the bundle folder to write); only "
                             "--pretrain ... --no-bundle, which writes no bundle, does without.")
    if not args.pretrain:
        from dicompipe.train.train import train_bundle
        train_bundle(args.data, args.organ, args.out, epochs=args.epochs, sizes=args.sizes,
                     budget_minutes=args.budget_minutes, low_size=args.low_size, lr=args.lr,
                     resume=args.resume, label_map=args.label_map, seed=args.seed,
                     threads=args.threads, workdir=args.workdir, bf16=args.bf16)
        return 0
    import time
    from pathlib import Path

    from dicompipe.train.run import finalize_bundle, run_lesion_training, series_name
    phases = []
    for part in args.phases.split(","):
        try:
            name, minutes, size = part.split(":")
            phases.append((name, float(minutes), int(size)))
        except ValueError:
            raise DicompipeError(f"--phases entry {part!r} is not NAME:MINUTES:SIZE "
                                 "(e.g. pretrain:40:128).") from None
    if not 0 <= args.abnormal_top < 1:
        raise DicompipeError(f"--abnormal-top {args.abnormal_top:g} is not in [0, 1): the share of "
                             "class-map cells each abnormal logit averages (0 = all, the standard head).")
    if args.input_region and args.organ != "lung":
        raise DicompipeError(f"--input-region {args.input_region} is for the lung only (the "
                             f"{args.organ} has no such region yet); leave it out.")
    if args.region_dropout and (args.organ != "lung" or args.input_region
                                or not 0 < args.region_dropout <= 1):
        raise DicompipeError(f"--region-dropout {args.region_dropout:g}: a share in (0, 1], for "
                             "the lung, without --input-region (which shows every slice through "
                             "the lung fields).")
    if not 0 <= args.real_share < 1:
        raise DicompipeError(f"--real-share {args.real_share:g} is not in [0, 1): each batch "
                             "needs synthetic lesion slices for the location loss.")
    if not args.split_file:
        raise DicompipeError("--pretrain needs --split-file (a bundle's docs/split.json) so "
                             "that the test part stays the one earlier bundles were scored on.")
    workdir = Path(args.workdir or Path("training") / f"{args.organ}-lesions")

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    state = run_lesion_training(args.data, args.organ, args.split_file, workdir, phases,
                                threads=args.threads, lr=args.lr, init=args.init,
                                cam_weight=args.cam_weight, layer4_dilation=args.layer4_dilation,
                                abnormal_top=args.abnormal_top,
                                extra_normals=args.extra_normals, real_share=args.real_share,
                                lesion_box=args.lesion_box, bf16=args.bf16, device=args.device,
                                workers=args.workers, prepared=args.prepared, bs=args.batch_size,
                                input_region=args.input_region,
                                region_dropout=args.region_dropout, log=log)
    last = workdir / f"phase{len(phases) - 1}_{phases[-1][0]}.safetensors"
    if args.no_bundle:
        print(f"trained: {last}; the same command without --no-bundle writes the bundle")
        return 0
    training = {"recipe": f"dicompipe train {Path(args.data).name} --organ {args.organ} "
                          f"--pretrain synthetic-lesions --phases {args.phases} --lr {args.lr:g} "
                          f"--cam-weight {args.cam_weight:g} --layer4-dilation {args.layer4_dilation}"
                          f" --real-share {args.real_share:g}"
                          + (f" --abnormal-top {args.abnormal_top:g}" if args.abnormal_top else "")
                          + (f" --lesion-box {args.lesion_box:g}" if args.organ == "pancreas" else "")
                          + (f" --init {Path(args.init).name}" if args.init else "")
                          + (f" --input-region {args.input_region}" if args.input_region else "")
                          + (f" --region-dropout {args.region_dropout:g}" if args.region_dropout else "")
                          + (" --bf16" if args.bf16 else "")
                          + (f" --batch-size {args.batch_size}" if args.batch_size != 32 else "")
                          + (" --device cuda" if state.get("trained_on", "cpu") != "cpu" else "")
                          + "".join(f" --extra-normals {series_name(s)}" for s in args.extra_normals),
                "phases": [list(p) for p in phases], "steps": state["step"],
                "trained_on": state.get("trained_on", "cpu"),
                "backbone_init": Path(args.init).name if args.init else "random (from scratch)",
                "checks": state["history"]}
    finalize_bundle(last, args.organ, args.data, args.split_file, args.out, size=phases[-1][2],
                    version=args.version, training=training, workdir=workdir.parent, log=log)
    return 0


def _p_evaluate(sub):
    p = sub.add_parser("evaluate", help="evaluate a bundle on a leak-free split, write metrics")
    p.add_argument("data", help="class-folder image tree or CSV manifest")
    p.add_argument("--model", required=True, help="bundle name or folder")
    p.add_argument("--out", required=True, help="folder for metrics.json and figures")
    p.add_argument("--label-map", help='folder=label pairs, e.g. "Bengin cases=benign"')
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--workdir", help="where the rendered-image cache goes (default training)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from dicompipe.train.evaluate import evaluate
    evaluate(args.data, args.model, args.out, label_map=args.label_map, n_boot=args.n_boot or 1000,
             workdir=args.workdir or "training")
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def _p_history(sub):
    p = sub.add_parser("history", help="the case history (list, show, export)")
    p.add_argument("--db", help="history database (default: user data dir)")
    hs = p.add_subparsers(dest="history_cmd", required=True)
    lp = hs.add_parser("list", help="list recorded analyses")
    lp.add_argument("--patient", help="patient pseudonym (or ID with --include-phi records)")
    lp.add_argument("--since", help="YYYY-MM-DD")
    lp.add_argument("--organ")
    lp.add_argument("--json", action="store_true")
    sp = hs.add_parser("show", help="show one record")
    sp.add_argument("id", type=int)
    ep = hs.add_parser("export", help="export the history")
    ep.add_argument("--csv", metavar="FILE", default="-", help="CSV file (default: stdout)")
    p.set_defaults(func=_cmd_history)


def _cmd_history(args) -> int:
    import json

    from dicompipe import history
    if args.history_cmd == "list":
        rows = history.list_records(args.db, patient=args.patient, since=args.since,
                                    organ=args.organ)
        print(json.dumps(rows, indent=2) if args.json else history.list_text(rows, args.db))
    elif args.history_cmd == "show":
        print(history.record_text(history.get(args.id, args.db)))
    else:
        n = history.export_csv(args.csv, args.db)
        if args.csv not in (None, "-"):
            print(f"{n} record(s) written to {args.csv}", file=sys.stderr)
    return 0


def _p_ui(sub):
    p = sub.add_parser("ui", help="start the web app (needs dicompipe[ui])")
    p.add_argument("--port", type=int, default=8501, help="port to listen on (default %(default)s)")
    p.add_argument("--host", default="localhost",
                   help="address to listen on (default %(default)s: this machine only); anything "
                        "but loopback needs sign-in (DICOMPIPE_UI_TOKEN, --token-file or --oidc) "
                        "or --insecure-no-auth")
    p.add_argument("--data-root", action="append", metavar="DIR",
                   help="a server folder users may analyse (repeatable); without one the "
                        "app offers uploads only")
    p.add_argument("--token-file", metavar="FILE",
                   help="access tokens: 'user:token' lines, or one shared token "
                        "(or set DICOMPIPE_UI_TOKEN; never give a token on the command line)")
    p.add_argument("--oidc", action="store_true",
                   help="sign in with Streamlit's built-in OIDC ([auth] in .streamlit/secrets.toml)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve a non-loopback address with no sign-in (trusted networks only)")
    p.add_argument("--max-jobs", type=int, default=None, metavar="N",
                   help="analyses running at once, all users together (default 2)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="inference backend of every analysis (default auto: fp32); e.g. "
                        "openvino-int8, about 4x the model's fp32 speed on a CPU with VNNI (both "
                        "built-in bundles ship a validated int8); checked, and compiled, at start")
    p.set_defaults(func=_cmd_ui)


def _cmd_ui(args) -> int:
    from dicompipe.ui import launch
    return launch(args)


def _case_args(p, *, organ_default: str, out_help: str = "parent folder of the run folders",
               organ_help: str = "organ model to use (auto: from headers, else from lung-air "
                                 "content)",
               format_help: str = "comma list of outputs: txt,png,json,nifti,dicom (default: all "
                                  "but dicom; dicom is added when results are pushed or "
                                  "forwarded)") -> None:
    """The run_case options the PACS and batch commands share with ``analyze``."""
    p.add_argument("--organ", choices=[*organs.names(), "auto"], default=organ_default,
                   help=organ_help)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--format", default=None, help=format_help)
    p.add_argument("--model", help="bundle name or folder (default: the organ's built-in bundle)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="inference backend")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--include-phi", action="store_true",
                   help="patient identifiers, paths and descriptions in report.txt, "
                        "analysis.json and the history (off by default: pseudonymised)")
    p.add_argument("--deidentify", action="store_true",
                   help="write the SR and SC (and so what is pushed/forwarded) without the "
                        "patient's name, ID, birth date, accession number, physicians and "
                        "institution (default: copied from the source, as a PACS needs)")
    p.add_argument("--history", help="case-history database file (default: user data dir)")
    p.add_argument("--no-history", action="store_true", help="do not record the cases")


def _case_kwargs(args) -> dict:
    return {"formats": args.format, "history": False if args.no_history else args.history,
            "include_phi": args.include_phi, "deidentify": args.deidentify,
            "model": args.model, "backend": args.backend, "device": args.device}


def _p_pull(sub):
    from dicompipe.pacs import AUTH_ENV
    p = sub.add_parser(
        "pull", help="analyse a study from a DICOMweb server (QIDO/WADO-RS), optionally push "
                     "the SR and SC back (STOW-RS)",
        description="Find a study on a DICOMweb server, retrieve its CT series into a "
                    "temporary folder, analyse it like `dicompipe analyze` and, with --push, "
                    "store the DICOM SR and the Secondary Capture series into the same study. "
                    f"Credentials come from ${AUTH_ENV} or --auth-file, never from the "
                    "command line. " + RESEARCH_USE)
    p.add_argument("--dicomweb", required=True, metavar="URL",
                   help="DICOMweb base URL, e.g. https://pacs.example/dicom-web")
    p.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID")
    p.add_argument("--series", metavar="UID",
                   help="retrieve only this series (default: every CT series of the study)")
    p.add_argument("--push", action="store_true",
                   help="store sr.dcm and sc/ into the study on the same server (STOW-RS)")
    p.add_argument("--auth", choices=["none", "bearer", "basic"], default="none",
                   help=f"bearer: a token, basic: a user:password line, read from --auth-file "
                        f"or ${AUTH_ENV} (default none)")
    p.add_argument("--auth-file", metavar="FILE", help="file holding the credential (chmod 600)")
    p.add_argument("--ca-bundle", metavar="PEM",
                   help="CA certificates to verify the server's TLS certificate with "
                        "(verification is always on)")
    p.add_argument("--max-download", default="4G", metavar="SIZE",
                   help="refuse studies larger than this (default %(default)s)")
    p.add_argument("--tmp", metavar="DIR", help="where the temporary download folder goes "
                                                "(default $TMPDIR; removed afterwards)")
    _case_args(p, organ_default="auto")
    p.set_defaults(func=_cmd_pull)


def _cmd_pull(args) -> int:
    from dicompipe.io.limits import parse_size
    from dicompipe.pacs.dicomweb import pull

    res = pull(args.dicomweb, args.study, series=args.series, organ=args.organ, out=args.out,
               push_results=args.push, auth=args.auth, auth_file=args.auth_file,
               ca_bundle=args.ca_bundle, max_download=parse_size(args.max_download),
               tmp_dir=args.tmp, say=print, **_case_kwargs(args))
    case = res.case
    if case.history_error is not None:
        print(f"warning: the case is not in the case history: {case.history_error}",
              file=sys.stderr)
    v = case.analysis.verdict
    probs = ", ".join(f"{k} {p:.2f}" for k, p in v.probabilities.items())
    state = "" if v.assessable else f" ({v.reason}; model output for transparency only)"
    print(f"{case.analysis.organ}: {v.label.upper()}{state}  [{probs}]")
    print(f"report: {case.run_dir}")
    print(RESEARCH_USE)
    return 0


def _p_listen(sub):
    p = sub.add_parser(
        "listen", help="DICOM receiver (C-STORE SCP): analyse every series it is sent",
        description="Receive series by DICOM C-STORE (and answer C-ECHO). A series is "
                    "complete after --settle seconds without a new instance; complete series "
                    "wait in a bounded queue for one worker that analyses each like "
                    "`dicompipe analyze` and forwards the SR and SC with --forward. A new "
                    "series is refused with status 0xA700 while the queue is full. Logs name "
                    "no patient. SIGTERM stops cleanly; what was not analysed stays in the "
                    "spool for the next start. " + RESEARCH_USE)
    p.add_argument("--aet", default="DICOMPIPE", help="this receiver's AE title (default %(default)s)")
    p.add_argument("--port", type=int, default=11112, help="port (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; use "
                        "0.0.0.0 with --allow-aet for a PACS on the network)")
    p.add_argument("--forward", metavar="AE@HOST:PORT",
                   help="send each result's SR and SC there (C-STORE)")
    p.add_argument("--forward-retries", type=int, default=2, metavar="N",
                   help="with --forward: try a failed send N more times, 5 s apart and "
                        "doubling, before leaving the results in the run folder "
                        "(default %(default)s)")
    p.add_argument("--allow-aet", action="append", metavar="AE",
                   help="accept associations only from this calling AE title (repeatable)")
    p.add_argument("--settle", type=float, default=10.0, metavar="S",
                   help="seconds without a new instance after which a series is complete "
                        "(default %(default)s)")
    p.add_argument("--queue", type=int, default=4, metavar="N",
                   help="complete series that may wait for analysis (default %(default)s)")
    p.add_argument("--spool", metavar="DIR",
                   help="where received instances are kept until analysed (default "
                        "OUT/.dicompipe-spool)")
    p.add_argument("--max-spool", default="8G", metavar="SIZE",
                   help="refuse instances (0xA700) while the spool holds more (default %(default)s)")
    _case_args(p, organ_default="auto")
    p.set_defaults(func=_cmd_listen)


def _cmd_listen(args) -> int:
    import logging
    import signal
    import threading

    from dicompipe.io.limits import parse_size
    from dicompipe.pacs.common import parse_peer, setup_logging
    from dicompipe.pacs.listener import Listener

    setup_logging()                  # dicompipe's lines only: others may name UIDs or patients
    lst = Listener(aet=args.aet, host=args.host, port=args.port, out=args.out,
                   organ=args.organ, spool=args.spool,
                   forward=parse_peer(args.forward) if args.forward else None,
                   allow_aet=args.allow_aet, settle_s=args.settle, queue_size=args.queue,
                   max_spool_bytes=parse_size(args.max_spool), case_options=_case_kwargs(args),
                   forward_retries=args.forward_retries)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_aet:
        logging.getLogger("dicompipe.pacs").warning(
            "listening on %s with no --allow-aet: any AE that reaches this port can store "
            "instances here", args.host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    lst.serve_forever(stop)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicompipe", description=__doc__.split("\n")[0],
                                     epilog=RESEARCH_USE)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    from dicompipe._version import __version__
    parser.add_argument("--version", action="version", version=f"dicompipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_p_series, _p_analyze, _p_batch, _p_train, _p_evaluate, _p_history, _p_ui,
                _p_pull, _p_listen):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DicompipeError as e:
        if args.debug:
            raise
        print(f"dicompipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dicompipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # e.g. `dicompipe series X --json | head`: the reader left
        # Python would complain again while flushing stdout at exit: point it at /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1                     # as Python's own docs recommend for EPIPE


if __name__ == "__main__":
    sys.exit(main())
