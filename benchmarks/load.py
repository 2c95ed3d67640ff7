"""Benchmark: discover + select + load of a 512×512×300 uncompressed CT series against
SimpleITK's ImageSeriesReader (GDCM) on the same files, in the same run.

Each measurement runs in a fresh child process (so peak RSS is that of one load, and the
page cache is warm for both readers alike); the two readers alternate, and the best of
``--repeat`` runs of each is compared (wall clock; the CPU time of all threads is printed
too, as a measure of work that other jobs on a busy machine disturb less). Timed: for
dicompipe, ``io.discover`` + ``io.select`` + ``io.load`` (float32 HU); for SimpleITK,
``ImageSeriesReader.Execute`` on the file list
already sorted (``sitk``) and, for reference, with GDCM's own discovery and sorting
(``GetGDCMSeriesFileNames`` + ``Execute``, ``sitk+gdcm-sort``).

Usage::

    python benchmarks/load.py                     # writes the series to a temp folder
    python benchmarks/load.py --dir /tmp/bench512 --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def reset_peak() -> bool:
    """Reset this process's peak RSS (Linux: the high-water mark survives exec from the parent)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(peak: bool = True) -> float:
    try:
        key = "VmHWM:" if peak else "VmRSS:"
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(kind: str, folder: str) -> None:
    """Run one measurement and print a JSON line: seconds, peak RSS, RSS before."""
    import numpy as np  # noqa: F401  (imported before the baseline, as both readers need it)
    import SimpleITK as sitk
    if kind == "dicompipe":
        from dicompipe import io
    files = sorted(Path(folder).iterdir())
    reset_peak()
    before = rss_mb(peak=False)
    c0 = time.process_time()
    t0 = time.perf_counter()
    if kind == "dicompipe":
        vol = io.load(io.select(io.discover(folder)))
        shape, pixel = vol.shape, vol.image.GetPixelIDTypeAsString()
    else:
        r = sitk.ImageSeriesReader()
        if kind == "sitk+gdcm-sort":
            r.SetFileNames(r.GetGDCMSeriesFileNames(folder))
        else:
            order = json.loads((Path(folder).parent / (Path(folder).name + ".order.json")).read_text())
            r.SetFileNames(order)
        img = r.Execute()
        size = img.GetSize()
        shape, pixel = (size[2], size[1], size[0]), img.GetPixelIDTypeAsString()
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    print(json.dumps({"kind": kind, "seconds": dt, "cpu_seconds": cpu, "peak_rss_mb": rss_mb(),
                      "rss_before_mb": before, "shape": list(shape), "pixel": pixel,
                      "n_files": len(files)}))


def make_series(folder: Path, shape=(300, 512, 512)) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import numpy as np
    import synth
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, shape, dtype=np.int16)
    files = synth.write_ct_series(folder, shape=shape, spacing=(0.7, 0.7, 1.0), hu=hu,
                                  names="noext", shuffle=True)
    (folder.parent / (folder.name + ".order.json")).write_text(json.dumps([str(f) for f in files]))


def run(kind: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(folder)],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="folder for the synthetic series (kept); default: a temp folder")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    tmp = None
    if args.dir:
        folder = Path(args.dir)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="dicompipe-bench-"))
        folder = tmp / "series"
    try:
        if not (folder.is_dir() and (folder.parent / (folder.name + ".order.json")).is_file()):
            t = time.perf_counter()
            make_series(folder)
            print(f"wrote 300 slices 512x512 int16 (explicit VR little endian, shuffled, no "
                  f"extensions) to {folder} in {time.perf_counter() - t:.1f} s")
        print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())} "
              f"on {os.cpu_count()} CPU(s) (other jobs make single runs noisy: compare the best)")
        kinds = ["dicompipe", "sitk", "sitk+gdcm-sort"]
        for k in kinds:                      # warm the page cache and imports once
            run(k, folder)
        results = {k: [] for k in kinds}
        for _ in range(args.repeat):
            for k in kinds:
                results[k].append(run(k, folder))
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
        for k in kinds:
            b = best[k]
            times = ", ".join(f"{r['seconds']:.3f}" for r in results[k])
            cpu = min(r["cpu_seconds"] for r in results[k])
            print(f"{k:<15} best {b['seconds']:.3f} s  (runs: {times}; least CPU {cpu:.3f} s)  "
                  f"peak RSS {b['peak_rss_mb']:.0f} MB "
                  f"(+{b['peak_rss_mb'] - b['rss_before_mb']:.0f} MB over imports)  "
                  f"{b['pixel']} {tuple(b['shape'])}")
        ratio = best["dicompipe"]["seconds"] / best["sitk"]["seconds"]
        ratio2 = best["dicompipe"]["seconds"] / best["sitk+gdcm-sort"]["seconds"]
        print(f"ratio dicompipe / SimpleITK ImageSeriesReader (pre-sorted files): {ratio:.2f}")
        print(f"ratio dicompipe / SimpleITK with GDCM discovery+sort:            {ratio2:.2f}")
        cpu = {k: min(r["cpu_seconds"] for r in v) for k, v in results.items()}
        print(f"CPU-time ratio dicompipe / SimpleITK (pre-sorted files, all threads): "
              f"{cpu['dicompipe'] / cpu['sitk']:.2f}")
        med = {k: sorted(r["seconds"] for r in v)[len(v) // 2] for k, v in results.items()}
        print(f"median ratio dicompipe / SimpleITK (pre-sorted files):             "
              f"{med['dicompipe'] / med['sitk']:.2f}")
        print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        return 0 if ratio <= 1.0 else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
