"""Hostile-input table (issue 15): build every bad input of the issue, run the ``dicompipe``
command on it in a fresh process (nice 19, 60 s limit, 12 GiB address-space cap) and print
one row per case: exit code, seconds, peak RSS and the last line of the message.

    python -m benchmarks.hostile [--only short_pixels,nan_ipp] [--json out.json]

Analyses use the shipped lung bundle (``--organ lung``, no CAM, txt/json only) and a private
history database; nothing is written outside a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parent.parent
LIDC = next((ROOT / "examples" / "lidc-idri-0001" / "series").glob("*/*"))


def _lidc(dst: Path, n: int = 8, edit=None) -> Path:
    """The first ``n`` LIDC example slices copied to ``dst``, each edited by ``edit(ds, i)``."""
    dst.mkdir(parents=True)
    for i, f in enumerate(sorted(LIDC.glob("*.dcm"))[:n]):
        ds = pydicom.dcmread(f)
        if edit:
            edit(ds, i)
        ds.save_as(dst / f.name)
    return dst


def _set(**kw):
    def edit(ds, i):
        for k, v in kw.items():
            setattr(ds, k, v)
    return edit


def _png_bomb(path: Path, w: int = 20000, h: int = 20000) -> Path:
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))
    return path


def _nifti_bomb(path: Path, dims=(2048, 2048, 1024)) -> Path:
    import nibabel as nib
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(dims)
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((1.0, 1.0, 1.0))
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    data = hdr.binaryblock + b"\0" * 4 + b"\0" * 64
    path.write_bytes(data)
    return path


def _zip_bomb(path: Path, gib: float) -> Path:
    block = b"\0" * (1 << 24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("export/big.dcm", "w", force_zip64=True) as f:
            for _ in range(int(gib * 64)):
                f.write(block)
    return path


def cases(tmp: Path) -> dict:
    """name -> (command args builder). Each builder makes its input and returns argv."""
    out = tmp / "runs"
    hist = tmp / "history.sqlite"

    def analyze(inp, *extra, history=None):
        return ["analyze", str(inp), "--organ", "lung", "--no-cam", "--format", "txt,json",
                "--out", str(out), "--quiet", "--history", str(history or hist), *extra]

    def c_short_pixels(d):
        def edit(ds, i):
            ds.PixelData = ds.PixelData[:1000]
        return analyze(_lidc(d, edit=edit), "--all-slices")

    def c_nan_ipp(d):
        def edit(ds, i):
            if i == 3:
                ds.ImagePositionPatient = ["nan", "nan", "nan"]
        return analyze(_lidc(d, edit=edit))

    def c_nan_slope(d):
        return analyze(_lidc(d, edit=_set(RescaleSlope="nan")))

    def c_inf_intercept(d):
        return analyze(_lidc(d, edit=_set(RescaleIntercept="inf")), "--all-slices")

    def c_rows_16000(d):
        return analyze(_lidc(d, edit=_set(Rows=16000, Columns=16000)))

    def c_rows_65535(d):
        return analyze(_lidc(d, edit=_set(Rows=65535, Columns=65535)))

    def c_nifti_bomb(d):
        d.mkdir()
        return analyze(_nifti_bomb(d / "bomb.nii"))

    def c_frames_1e8(d):
        d.mkdir()
        ds = pydicom.dcmread(sorted(LIDC.glob("*.dcm"))[0])
        ds.NumberOfFrames = 100000000
        ds.save_as(d / "mf.dcm")
        return ["series", str(d / "mf.dcm")]

    def c_fifo(d):
        d.mkdir()
        os.mkfifo(d / "x.dcm")
        return ["series", str(d / "x.dcm")]

    def c_fifo_in_folder(d):
        _lidc(d, 3)
        os.mkfifo(d / "x.dcm")
        return ["series", str(d)]

    def c_symlink_loop(d):
        _lidc(d, 3)
        os.symlink("loop.dcm", d / "loop.dcm")
        return ["series", str(d)]

    def c_png_bomb(d):
        from PIL import Image
        d.mkdir()
        for i in range(3):
            Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(d / f"s{i}.png")
        _png_bomb(d / "s9.png")
        return ["series", str(d)]

    def c_zero_spacing(d):
        return analyze(_lidc(d, edit=_set(PixelSpacing=[0, 0])))

    def c_negative_spacing(d):
        return analyze(_lidc(d, edit=_set(PixelSpacing=[-0.7, -0.7])))

    def c_degenerate_iop(d):
        return analyze(_lidc(d, edit=_set(ImageOrientationPatient=[1, 0, 0, 1, 0, 0])))

    def c_negative_thickness_no_position(d):
        def edit(ds, i):
            del ds.ImagePositionPatient
            ds.SliceThickness = -2.5
        _lidc(d, 1, edit=edit)
        return ["series", str(d)], ("python", "-c",
                                    "import sys, dicompipe as d; "
                                    "v = d.io.load(d.io.select(d.io.discover(sys.argv[1]))); "
                                    "print(v.image.GetSpacing())",
                                    str(d))

    def c_zip_bomb(d):
        d.mkdir()
        return ["series", str(_zip_bomb(d / "bomb.zip", 2.0))]

    def c_bad_history(d):
        _lidc(d, 8)
        bad = d.parent / "bad-history.sqlite"
        bad.write_text("not a database")
        return analyze(d, history=bad)

    def c_foreign_sqlite(d):
        _lidc(d, 8)
        db = d.parent / "foreign.sqlite"
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE analyses (id INTEGER PRIMARY KEY, what TEXT)")
        con.commit()
        con.close()
        return analyze(d, history=db)

    def c_bits_allocated_0(d):
        return analyze(_lidc(d, edit=_set(BitsAllocated=0)))

    def c_nifti_2d(d):
        import nibabel as nib
        d.mkdir()
        nib.save(nib.Nifti1Image(np.full((64, 64), -700, np.int16), np.eye(4)), d / "one.nii.gz")
        return analyze(d / "one.nii.gz")

    return {k[2:]: v for k, v in locals().items() if k.startswith("c_")}


def run(argv: list[str], timeout: float = 60.0) -> dict:
    """Run ``dicompipe ARGV`` (or a raw command tuple) niced, capped; rc, time, RSS, message."""
    cmd = list(argv[1:]) if isinstance(argv, tuple) else ["-m", "dicompipe.cli", *argv]
    cmd = [sys.executable] + cmd

    def limits():
        os.nice(19)
        resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         preexec_fn=limits, cwd=ROOT, start_new_session=True)
    rc, rss, timed_out = None, 0.0, False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            rc = os.waitstatus_to_exitcode(status)
            rss = ru.ru_maxrss / 1024
            break
        if time.monotonic() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            _, status, ru = os.wait4(p.pid, 0)
            rss, timed_out = ru.ru_maxrss / 1024, True
            break
        time.sleep(0.1)
    text = p.stdout.read().decode("utf-8", "replace").strip()
    lines = [l for l in text.splitlines() if l.strip()]
    trace = "Traceback" in text
    last = lines[-1] if lines else ""
    if not trace:
        err = [l for l in lines if l.startswith("dicompipe: error:")]
        verdict = [l for l in lines if l.startswith("lung:")]
        last = (err or verdict or [last])[0]
    return {"rc": "timeout" if timed_out else rc, "seconds": round(time.monotonic() - t0, 1),
            "peak_rss_mb": round(rss), "traceback": trace, "message": last[:400]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma list of case names")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dicompipe-hostile-") as tmp:
        tmp = Path(tmp)
        for name, build in cases(tmp).items():
            if args.only and name not in args.only.split(","):
                continue
            d = tmp / name
            got = build(d)
            cmds = got if isinstance(got, tuple) and isinstance(got[0], list) else (got,)
            for j, c in enumerate(cmds):
                key = name if j == 0 else f"{name}[lib]"
                r = rows[key] = run(c, args.timeout)
                if name == "foreign_sqlite":
                    db = tmp / "foreign.sqlite"
                    con = sqlite3.connect(db)
                    r["journal_mode"] = con.execute("PRAGMA journal_mode").fetchone()[0]
                    con.close()
                if name == "bad_history":
                    r["run_folders"] = len(list((tmp / "runs").glob("*"))) if (tmp / "runs").exists() else 0
                print(f"{key:<34} rc={r['rc']!s:<8} {r['seconds']:>6}s {r['peak_rss_mb']:>6} MB  "
                      f"{'TRACEBACK ' if r['traceback'] else ''}{r['message'][:200]}"
                      + (f"  [journal={r['journal_mode']}]" if "journal_mode" in r else "")
                      + (f"  [run folders={r['run_folders']}]" if "run_folders" in r else ""),
                      flush=True)
            shutil.rmtree(tmp / "runs", ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
