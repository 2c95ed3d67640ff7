"""Seeded mutation fuzzing of the input stage (issue 15): real headers and pixel data from
pydicom's bundled test files and the examples, mutated (hostile header values, byte flips,
truncation, splices), then ``io.discover`` → ``io.select`` → ``io.load`` → the pipeline's
volume check. Every outcome must be a volume or a :class:`dicompipe.DicompipeError`; any
other exception is a crash, a case over ``--max-seconds`` of CPU time is slow, and one that
runs 3 times longer (or blocks 120 s) a hang.

    python -m benchmarks.fuzz --cases 20000 [--seed 0] [--json out.json]

The test suite runs a few hundred cases of the same generator (tests/test_fuzz.py). A case
is reproducible from (seed, index): ``python -m benchmarks.fuzz --seed S --only INDEX``.
"""
from __future__ import annotations

import argparse
import collections
import io as _bio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parent.parent
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
                 "MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG-lossy.dcm", "rtplan.dcm",
                 "MR_truncated.dcm", "ExplVR_BigEndNoMeta.dcm", "no_meta_group_length.dcm")

#: hostile values per attribute (strings are written as-is, so DS/IS may hold "nan")
HOSTILE = {
    "Rows": [0, 1, 2, 4096, 65535], "Columns": [0, 1, 3, 4096, 65535],
    "BitsAllocated": [0, 1, 7, 12, 24, 64], "BitsStored": [0, 1, 40], "HighBit": [0, 63],
    "PixelRepresentation": [1, 2, 5], "SamplesPerPixel": [0, 2, 3, 4],
    "NumberOfFrames": ["0", "-1", "2", "100000000", "abc"],
    "ImagePositionPatient": [["nan", "0", "0"], ["inf", "-inf", "0"], ["1e308"] * 3, ["1", "2"],
                             ["0", "0", "1e6"]],
    "ImageOrientationPatient": [["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["nan"] * 6,
                                ["1", "0", "0", "0", "0", "0"], ["0", "1", "0", "0", "0", "-1"]],
    "PixelSpacing": [["0", "0"], ["-1", "1"], ["nan", "1"], ["1e30", "1e30"], ["1e-30", "1"]],
    "RescaleSlope": ["nan", "0", "1e30", "-inf", "-1", "abc"],
    "RescaleIntercept": ["inf", "1e38", "-1e30", "nan"],
    "SliceThickness": ["-2", "nan", "0", "1e300"], "SpacingBetweenSlices": ["nan", "-1", "0"],
    "PhotometricInterpretation": ["RGB", "PALETTE COLOR", "", "YBR_FULL", "MONOCHROME1"],
    "Modality": ["MR", "", "SR", "CT"], "SeriesInstanceUID": ["", "1.2.3"],
    "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.11", ""],
    "ImageType": [["LOCALIZER"], ["DERIVED", "SECONDARY"]],
    "GantryDetectorTilt": ["nan", "89.9", "-45"],
}
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                     "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90",
                     "1.2.840.10008.1.2.5", "1.2.3.4.5", ""]


# --------------------------------------------------------------------------- seeds
def _nifti_bytes(gz: bool) -> bytes:
    import gzip

    import nibabel as nib
    img = nib.Nifti1Image(np.linspace(-1000, 400, 6 * 16 * 16).reshape(16, 16, 6).astype(np.int16),
                          np.diag([0.8, 0.8, 2.5, 1.0]))
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def _png_bytes() -> bytes:
    from PIL import Image
    buf = _bio.BytesIO()
    Image.fromarray((np.arange(32 * 32) % 256).reshape(32, 32).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def seeds() -> list[tuple[str, bytes]]:
    """(file name, bytes) of every seed: pydicom's bundled files, example slices, a NIfTI,
    a gzipped NIfTI and a PNG (built in memory)."""
    base = Path(pydicom.data.__file__).parent / "test_files"
    out = [(n, (base / n).read_bytes()) for n in PYDICOM_FILES if (base / n).is_file()]
    lidc = sorted((ROOT / "examples" / "lidc-idri-0001" / "series").glob("*/*/*.dcm"))[:2]
    abd = sorted((ROOT / "examples" / "abdomen-ct-dicom" / "series").glob("*"))[:2]
    out += [(p.name + ("" if p.suffix == ".dcm" else ".dcm"), p.read_bytes()) for p in lidc + abd]
    jpg = sorted((ROOT / "examples" / "lung-slices").glob("*/*.jpg"))[:1]
    out += [(p.name, p.read_bytes()) for p in jpg]
    out += [("v.nii", _nifti_bytes(False)), ("v.nii.gz", _nifti_bytes(True)), ("s.png", _png_bytes())]
    return out


# --------------------------------------------------------------------------- mutations
def _header_edit(data: bytes, rng: random.Random) -> bytes | None:
    """Set 1-3 attributes to hostile values, maybe cut or pad Pixel Data; None if pydicom
    cannot parse or write the result (the caller then flips bytes instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(_bio.BytesIO(data), force=True)
            for kw in rng.sample(sorted(HOSTILE), rng.randint(1, 3)):
                setattr(ds, kw, rng.choice(HOSTILE[kw]))
            if "PixelData" in ds and rng.random() < 0.3:
                pd = ds.PixelData
                ds.PixelData = rng.choice([pd[:rng.randint(0, len(pd))], pd + pd, b"", pd[:-1]])
            if rng.random() < 0.15 and getattr(ds, "file_meta", None) is not None:
                ds.file_meta.TransferSyntaxUID = rng.choice(TRANSFER_SYNTAXES)
            buf = _bio.BytesIO()
            ds.save_as(buf)
            return buf.getvalue()
        except Exception:  # noqa: BLE001 - an unwritable mutation: use another kind
            return None


def mutate(name: str, data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of ``data``: (bytes, kind)."""
    kinds = ["header", "flip", "truncate", "splice"] if name.endswith(".dcm") else \
            ["flip", "truncate", "splice", "header_bytes"]
    kind = rng.choice(kinds)
    if kind == "header":
        out = _header_edit(data, rng)
        if out is not None:
            return out, kind
        kind = "flip"
    b = bytearray(data)
    if kind == "truncate":
        return bytes(b[:rng.randint(0, len(b))]), kind
    if kind == "splice":
        at = rng.randint(0, len(b))
        if rng.random() < 0.5:
            del b[at:at + rng.randint(1, 4096)]
        else:
            b[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        return bytes(b), kind
    # flip / header_bytes: change a few bytes, mostly in the header region
    for _ in range(rng.randint(1, 32)):
        if not b:
            break
        hi = min(len(b), 2048) if kind == "header_bytes" or rng.random() < 0.7 else len(b)
        i = rng.randrange(hi)
        b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.getrandbits(8)])
    return bytes(b), kind


def build_case(folder: Path, corpus: list[tuple[str, bytes]], rng: random.Random) -> str:
    """Write one case (1-3 files from one seed, at least one mutated) into ``folder``;
    return a short description."""
    name, data = rng.choice(corpus)
    folder.mkdir(parents=True)
    kinds = []
    n = rng.choice([1, 1, 2, 3]) if name.endswith((".dcm", ".png", ".jpg")) else 1
    for i in range(n):
        blob, kind = mutate(name, data, rng) if i == 0 or rng.random() < 0.5 else (data, "seed")
        kinds.append(kind)
        stem, dot, ext = name.partition(".")
        (folder / f"f{i}.{ext or 'dcm'}").write_bytes(blob)
    return f"{name}: {'+'.join(kinds)}"


# --------------------------------------------------------------------------- running
class Hang(Exception):
    pass


def run_case(folder: Path, max_memory="256M") -> str:
    """Outcome of one case: "volume", or the DicompipeError subclass name. Any other
    exception propagates (a crash)."""
    from dicompipe import io
    from dicompipe.errors import DicompipeError
    from dicompipe.pipeline import _check_volume
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = io.discover(folder)
            vol = io.load(io.select(found), max_memory=max_memory)
            _check_volume(vol)
            if not (np.isfinite(vol.array).all() and np.isfinite(vol.image.GetSpacing()).all()
                    and np.isfinite(vol.image.GetOrigin()).all()):
                raise AssertionError("non-finite volume or geometry returned")
            return "volume"
        except DicompipeError as e:
            return type(e).__name__


def campaign(cases: int, seed: int = 0, max_seconds: float = 10.0, only: int | None = None,
             log=None) -> dict:
    """Run ``cases`` cases; returns counts, timings and the failures (crash/hang/slow)."""
    corpus = seeds()
    counts: collections.Counter = collections.Counter()
    failures, slowest = [], 0.0

    def alarm(*_):
        raise Hang()
    # a case is timed in CPU seconds (a busy machine must not make it "slow"); a hang is
    # 3 x max_seconds of CPU (ITIMER_PROF) or, for a blocked read, 120 s of wall time
    old = signal.signal(signal.SIGALRM, alarm)
    old_prof = signal.signal(signal.SIGPROF, alarm)
    t_all, c_all = time.monotonic(), time.process_time()
    tmp = Path(tempfile.mkdtemp(prefix="dicompipe-fuzz-"))
    try:
        for i in range(cases):
            rng = random.Random(f"{seed}:{i}")
            if only is not None and i != only:
                continue
            folder = tmp / f"c{i}"
            what = build_case(folder, corpus, rng)
            t0 = time.process_time()
            signal.alarm(max(120, int(max_seconds * 6)))
            signal.setitimer(signal.ITIMER_PROF, max_seconds * 3)
            try:
                outcome = run_case(folder)
            except Hang:
                outcome = "hang"
                failures.append({"case": i, "what": what, "error": "hang"})
            except Exception as e:  # noqa: BLE001 - the thing being looked for
                outcome = "crash"
                failures.append({"case": i, "what": what, "error": f"{type(e).__name__}: {e}"[:300]})
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
                signal.alarm(0)
            dt = time.process_time() - t0
            slowest = max(slowest, dt)
            if dt > max_seconds and outcome not in ("hang", "crash"):
                failures.append({"case": i, "what": what, "error": f"slow: {dt:.1f} s"})
                outcome = "slow"
            counts[outcome] += 1
            if log and outcome in ("hang", "crash", "slow"):
                log(f"FAILURE {json.dumps(failures[-1])}")
            shutil.rmtree(folder, ignore_errors=True)
            if log and (i + 1) % 1000 == 0:
                log(f"{i + 1} cases, {dict(counts)}")
    finally:
        signal.signal(signal.SIGALRM, old)
        signal.signal(signal.SIGPROF, old_prof)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cases": sum(counts.values()), "seed": seed,
            "wall_s": round(time.monotonic() - t_all, 1),
            "cpu_s": round(time.process_time() - c_all, 1),
            "slowest_case_cpu_s": round(slowest, 2), "outcomes": dict(counts.most_common()),
            "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, help="run only this case index (reproduce a failure)")
    ap.add_argument("--max-seconds", type=float, default=10.0)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    res = campaign(args.cases, args.seed, args.max_seconds, args.only,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
