"""Verdict, OOD score and confidence badge of one bundle on every shared input.

Inputs: the shared DICOM series (``../shared/data``), the examples under ``examples/`` and 20
random images (seeded) of the bundle's shared image set, each image analysed alone, as a
user would drop one JPG. Run it on a bundle before and after its OOD model is fitted
(``benchmarks.fit_ood``) to get the before/after table::

    python -m benchmarks.ood_verdicts lung --model <bundle> --out benchmarks/results/ood_verdicts_lung_before.json
    python -m benchmarks.ood_verdicts --compare before.json after.json     # markdown table
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

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


def run(organ: str, model: str | None) -> dict:
    from dicompipe.model.bundle import load_bundle
    from dicompipe.model.confidence import confidence_of
    from dicompipe.pipeline import analyze

    bundle = load_bundle(model or f"{organ}-resnet50")
    rows = {}
    for name, path in inputs(organ):
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
    return {"bundle": f"{bundle.name} {bundle.version}", "sha256": bundle.sha256,
            "ood_threshold": (bundle.metadata.get("ood") or {}).get("slice_threshold"),
            "inputs": rows}


def compare(before: dict, after: dict) -> str:
    lines = [f"| input | before ({before['bundle']}, no OOD) | after (OOD threshold "
             f"{after['ood_threshold']:.1f}) | OOD median score, slices out |",
             "|---|---|---|---|"]
    for name, b in before["inputs"].items():
        a = after["inputs"].get(name, {})
        fmt = lambda r: (f"{r['verdict']}" + (f" {r['p_top']:.2f}" if r.get("p_top") is not None else "")
                         + f" · {r['badge']}")
        lines.append(f"| {name} | {fmt(b)} | {fmt(a) if a else '-'} | "
                     f"{a.get('ood_median_score')}, {a.get('ood_out_slices')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("organ", nargs="?", choices=["lung", "pancreas"])
    ap.add_argument("--model", help="bundle name or folder (default: the organ's built-in)")
    ap.add_argument("--out", help="JSON to write")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(*(json.loads(Path(p).read_text()) for p in args.compare)))
        return
    res = run(args.organ, args.model)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
