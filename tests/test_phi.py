"""PHI (issue 15): a series whose patient module, folder, file names and SeriesDescription
identify the patient. Without --include-phi nothing identifying may reach report.txt,
analysis.json, PNG text chunks, the NIfTI header, the history or stdout/stderr; with
--deidentify the DICOM SR/SC carry no identifiers either. With --include-phi they appear."""
import gzip
import json
import sqlite3
import warnings

import pydicom
import pytest
from PIL import Image
from synth import write_ct_series
from tiny_bundle import chest_phantom, make_bundle

from dicompipe import history
from dicompipe.cli import main
from dicompipe.types import PreprocessSpec

IDS = ["Doe", "Jane", "MRN12345", "19600102", "ACC998877", "St Elsewhere"]
SPEC = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)], size=64,
                      slab_mm=5.0)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    base = tmp_path_factory.mktemp("phi")
    root = base / "Doe_Jane_MRN12345_export"
    files = write_ct_series(root, shape=(12, 48, 48), spacing=(0.8, 0.8, 2.5),
                            origin=(-19.0, -19.0, -100.0), body_part="CHEST",
                            hu=chest_phantom((12, 48, 48), lung_z=(0.2, 1.0)),
                            description="Jane Doe MRN12345 chest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN12345", "19600102"
            ds.AccessionNumber, ds.InstitutionName = "ACC998877", "St Elsewhere"
            ds.ReferringPhysicianName = "Doe^John"
            ds.save_as(root / f"MRN12345_{i:03d}.dcm")
            f.unlink()
    bundle = make_bundle(base / "bundle", organ="lung", spec=SPEC, trained=True, favour="malignant")
    return base, root, bundle


def _run(base, root, bundle, name, *extra):
    out, db = base / name, base / f"{name}.sqlite"
    rc = main(["analyze", str(root), "--organ", "lung", "--model", str(bundle), "--out", str(out),
               "--history", str(db), "--quiet", "--backend", "torch", "--device", "cpu", *extra])
    assert rc == 0
    (run,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return run, db


def _texts(run, db, capsys, tmp_path):
    """Every output as text: name -> str."""
    std = capsys.readouterr()
    t = {"stdout": std.out, "stderr": std.err}
    for p in run.rglob("*"):
        if p.suffix in (".txt", ".json"):
            t[p.name] = p.read_text()
        elif p.suffix == ".png":
            with Image.open(p) as im:
                t[p.name] = json.dumps({**im.info, **getattr(im, "text", {})}, default=str)
        elif p.name.endswith(".nii.gz"):
            t[p.name] = gzip.decompress(p.read_bytes())[:352].decode("latin-1")
        elif p.suffix == ".dcm":
            t[str(p.relative_to(run))] = p.read_bytes().decode("latin-1")
    history.export_csv(tmp_path / "h.csv", db=db)
    t["history.csv"] = (tmp_path / "h.csv").read_text()
    assert main(["history", "--db", str(db), "show", "1"]) == 0
    t["history show"] = capsys.readouterr().out
    con = sqlite3.connect(db)
    t["history rows"] = json.dumps([list(r) for r in con.execute("SELECT * FROM analyses")])
    con.close()
    return t


def _leaks(texts):
    return {(name, i) for name, text in texts.items() for i in IDS if i in text}


def test_nothing_identifying_without_include_phi(case, capsys, tmp_path):
    base, root, bundle = case
    run, db = _run(base, root, bundle, "plain", "--format", "txt,png,json,nifti,dicom",
                   "--deidentify", "--ct-nifti")
    texts = _texts(run, db, capsys, tmp_path)
    assert {"report.txt", "analysis.json", "ct.nii.gz", "sr.dcm", "stdout", "history.csv"} <= set(texts)
    assert any(n.endswith(".png") for n in texts) and any(n.startswith("sc/") for n in texts)
    assert _leaks(texts) == set()
    d = json.loads(texts["analysis.json"])
    assert d["input"] == "<input>" and d["series"]["source"] == "<input>"
    assert d["series"]["series_description"] is None
    assert all(f.startswith("<input>/file-") for r in d["slices"] for f in r["files"])
    assert history.list_records(db)[0]["input_path"].startswith("I-")
    sr = pydicom.dcmread(run / "sr.dcm")
    assert sr.PatientName == "ANONYMOUS" and sr.PatientIdentityRemoved == "YES"


def test_include_phi_and_pacs_objects_keep_identity(case, capsys, tmp_path):
    base, root, bundle = case
    run, db = _run(base, root, bundle, "phi", "--format", "txt,json,dicom", "--include-phi")
    texts = _texts(run, db, capsys, tmp_path)
    assert "MRN12345" in texts["report.txt"] and str(root) in texts["analysis.json"]
    assert "MRN12345_000.dcm" in texts["analysis.json"] and str(root) in texts["history.csv"]
    assert "Jane Doe MRN12345 chest" in texts["stdout"]
    sr = pydicom.dcmread(run / "sr.dcm")                  # as a PACS needs it (README)
    assert sr.PatientID == "MRN12345" and str(sr.PatientName) == "Doe^Jane"
