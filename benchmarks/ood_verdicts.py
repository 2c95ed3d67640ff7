"""Verdict, OOD score and confidence badge of one bundle on every shared input.

Inputs: the shared DICOM series (``../shared/data``), the examples under ``examples/``, 20
random images (seeded) of the bundle's shared image set, each image analysed alone, as a
user would drop one JPG, and a volume of pure noise (uniform -1000..1000 HU). "Before" is the
bundle with its OOD model left out (``--without-ood``)::

    python -m benchmarks.ood_verdicts lung --without-ood --out benchmarks/results/ood_verdicts/lung_before.json
    python -m benchmarks.ood_verdicts lung --out benchmarks/results/ood_verdicts/lung_after.json
    python -m benchmarks.ood_verdicts --compare before.json after.json     # markdown table
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DICOM = ["lung-pet-ct-dx-a0001/series", "lidc-idri-0001", "abdomen-ct-dicom/series"]
EXAMPLES = {"lung": ["lidc-idri-0001", "lung-slices/normal", "lung-slices/malignant"],
            "pancreas": ["abdomen-ct-dicom", "pancreas-slices/normal", "pancreas-slices/tumour"]}
IMAGE_SET = {"lung": "iq-othnccd", "pancreas": "pancreas-ct-kaggle"}


def inputs(organ: str, n_images: int = 20, seed: int = 0) -> list[tuple[str, Path]]:
    """(name, path) of every input: shared DICOM, examples, ``n_images`` random images."""
    out = [(f"shared/{d}", SHARED / d) for d in DICOM if (SHARED / d).exists()]
    out += [(f"examples/{e}", ROOT / "examples" / e) for e in EXAMPLES[organ]]
    images = sorted(p for p in (SHARED / IMAGE_SET[organ]).rglob("*")
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for p in random.Random(seed).sample(images, min(n_images, len(images))):
        out.append((f"{IMAGE_SET[organ]}/{p.relative_to(SHARED / IMAGE_SET[organ])}", p))
    return out


def noise_volume(folder: Path) -> Path:
    """A NIfTI of uniform noise, -1000..1000 HU, 24 x 256 x 256 at 1 x 1 x 2.5 mm."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.random.default_rng(0).uniform(-1000, 1000, (24, 256, 256))
                                 .astype(np.float32))
    img.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(img, str(folder / "noise.nii.gz"))
    return folder / "noise.nii.gz"


def without_ood(bundle_path: Path, folder: Path) -> Path:
    """A copy of the bundle with its OOD model left out (the behaviour before it shipped)."""
    dst = folder / bundle_path.name
    shutil.copytree(bundle_path, dst, ignore=shutil.ignore_patterns("ood.safetensors"))
    md_file = dst / "configs" / "metadata.json"
    md = json.loads(md_file.read_text())
    md.pop("ood", None)
    md_file.write_text(json.dumps(md, indent=2))
    return dst


def run(organ: str, model: str | None, *, strip_ood: bool = False, only: str | None = None) -> dict:
    from dicompipe.model.bundle import load_bundle
    from dicompipe.model.confidence import confidence_of
    from dicompipe.pipeline import analyze

    tmp = Path(tempfile.mkdtemp(prefix="dicompipe-ood-verdicts-"))
    bundle = load_bundle(model or f"{organ}-resnet50")
    if strip_ood:
        bundle = load_bundle(without_ood(Path(bundle.path), tmp))
    rows = {}
    todo = inputs(organ) + [("synthetic/noise.nii.gz (uniform -1000..1000 HU)", noise_volume(tmp))]
    for name, path in todo:
        if only and only not in name:
            continue
        t = time.perf_counter()
        a = analyze(path, organ, model=bundle, cam=False, select_slices=False)
        v, conf = a.verdict, confidence_of(a)
        ood = v.ood
        rows[name] = {
            "verdict": v.class_label if v.assessable else "not assessable",
            "p_top": round(float(v.probabilities.get(v.class_label, 0.0)), 3) if v.assessable else None,
            "ood_available": bool(ood and ood.available),
            "ood_median_score": (round(float(sorted(ood.scores)[len(ood.scores) // 2]), 1)
                                 if ood and ood.available and ood.scores else None),
            "ood_out_slices": f"{len(ood.out_rows)}/{len(ood.scores)}" if ood and ood.available else None,
            "badge": conf.status, "seconds": round(time.perf_counter() - t, 2)}
        print(name, rows[name], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"bundle": f"{bundle.name} {bundle.version}", "sha256": bundle.sha256,
            "ood_threshold": (bundle.metadata.get("ood") or {}).get("slice_threshold"),
            "inputs": rows}


def compare(before: dict, after: dict) -> str:
    lines = [f"| input | before ({before['bundle']}, no OOD) | after (OOD threshold "
             f"{after['ood_threshold']:.1f}) | OOD median score, slices out |",
             "|---|---|---|---|"]
    for name in dict.fromkeys([*before["inputs"], *after["inputs"]]):
        b, a = before["inputs"].get(name, {}), after["inputs"].get(name, {})
        fmt = lambda r: (f"{r['verdict']}" + (f" {r['p_top']:.2f}" if r.get("p_top") is not None else "")
                         + f" · {r['badge']}")
        lines.append(f"| {name} | {fmt(b) if b else '-'} | {fmt(a) if a else '-'} | "
                     f"{a.get('ood_median_score')}, {a.get('ood_out_slices')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("organ", nargs="?", choices=["lung", "pancreas"])
    ap.add_argument("--model", help="bundle name or folder (default: the organ's built-in)")
    ap.add_argument("--out", help="JSON to write (with --only: rows merged into it)")
    ap.add_argument("--without-ood", action="store_true", help="leave the bundle's OOD model out")
    ap.add_argument("--only", help="only inputs whose name contains this")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(*(json.loads(Path(p).read_text()) for p in args.compare)))
        return
    res = run(args.organ, args.model, strip_ood=args.without_ood, only=args.only)
    if args.out:
        out = Path(args.out)
        if args.only and out.exists():
            old = json.loads(out.read_text())
            old["inputs"].update(res["inputs"])
            res = old
        out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
