"""Bundles 2.x: the rendering spec per organ and the data/split set-up for lesion training.

Example::

    >>> spec = spec_v2("lung")
    >>> images, y, parts, normal_idx, labels = prepare_data("iq-othnccd/", "lung",
    ...     split_file="dicompipe/bundles/lung-resnet50/docs/split.json", workdir="training")
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from dicompipe import organs
from dicompipe.types import PreprocessSpec

CACHE_SIZE = 256

# Lung: the IQ-OTH/NCCD export holds only 0 or ~130..255 (measured: the 1st percentile of
# non-zero pixels is 129-130 in every file checked): fat and lung black, soft tissue from
# 130, bone white. HU input is rendered the same way: below 0 HU -> 0, 0..150 HU -> 130..255.
LUNG_TRANSFER = {"kind": "floor", "floor_hu": 0.0, "ceil_hu": 150.0, "low": 130.0}
# Pancreas: a wide soft-tissue window, then rank equalisation inside the body, so the
# Kaggle exports' different windows (and HU) all give the same image.
PANCREAS_TRANSFER = {"kind": "window", "window": [50.0, 500.0]}


def spec_v2(organ: str, size: int = 160, input_region: str | None = None) -> PreprocessSpec:
    """The 2.x rendering of ``organ``: transfer, body mask and crop (and equalisation);
    ``input_region`` "lung_fields": lung-only input (lung only)."""
    if organ == "lung":
        return PreprocessSpec(windows=[(-600.0, 1500.0)], size=size, transfer=LUNG_TRANSFER,
                              body_mask=True, mask_threshold=40.0, crop_margin=0.04,
                              input_region=input_region)
    if input_region:
        raise ValueError(f"input_region {input_region!r} is for the lung only")
    return PreprocessSpec(windows=[(50.0, 400.0)], size=size, transfer=PANCREAS_TRANSFER,
                          body_mask=True, mask_threshold=15.0, mask_adaptive=True, crop_margin=0.04,
                          equalize=True)


def dicom_normals(series, organ: str, size: int = CACHE_SIZE) -> np.ndarray:
    """Lesion-free training slices from DICOM/NIfTI series: every slice the organ's slice
    selection keeps, rendered exactly as inference renders it -> uint8 (n, size, size).

    >>> extra = dicom_normals(["studies/upper-abdomen/series"], "lung")
    """
    from dicompipe import io, preprocess
    from dicompipe.train import data as D

    spec = replace(spec_v2(organ), size=size)
    out = []
    for path in series:
        batch = preprocess.prepare(io.load(io.select(io.discover(path))), spec, organ=organ)
        out += [D.to_cache(t, spec) for t in batch.tensors]
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


def prepare_data(data, organ: str, split_file, workdir="training", extra_normals=(), log=print):
    """(images uint8 (n, 256, 256), y, parts, lesion-free training+val indices, labels),
    with the split read from ``split_file`` (a bundle's docs/split.json: relative path -> part).
    ``extra_normals``: DICOM series whose slices join the training part as normal
    (:func:`dicom_normals`)."""
    images, y, parts, labels = rendered_split(data, organ, split_file, replace(spec_v2(organ), size=CACHE_SIZE),
                                              workdir, log=log)
    parts = list(parts)
    if extra_normals:
        # a handful of slices among hundreds: each joins 4 times, so they are drawn at all
        extra = np.repeat(dicom_normals(extra_normals, organ), 4, axis=0)
        log(f"{len(extra) // 4} lesion-free DICOM slices join the training part as normal (x4)")
        images = np.concatenate([images, extra])
        parts += ["train"] * len(extra)
        y = np.concatenate([y, np.zeros(len(extra), y.dtype)])
    normal_idx = np.array([i for i, p in enumerate(parts) if p in ("train", "val") and y[i] == 0])
    return images, y, parts, normal_idx, labels


def prepared_data(path, data, organ: str, split_file, workdir, extra_normals=(),
                  lesion_box: float = 0.2, log=print) -> dict:
    """What lesion training needs, rendered once and kept in one ``.npz`` at ``path``:
    images, y, parts, normal_idx, labels, fields (where lesions may go). Written on first
    use from ``data`` (:func:`prepare_data`); later read from ``path`` alone, so that a
    machine without the raw data or the DICOM readers (a GPU box) can train on it.

    >>> d = prepared_data("training/lung.npz", "iq-othnccd", "lung", "split.json", "training")
    """
    from dicompipe.errors import DicompipeError
    from dicompipe.train.pretrain import lesion_fields
    path = Path(path)
    made_from = _prepared_from(organ, lesion_box, split_file, extra_normals)
    if path.exists():
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        differ = [f"{k} {meta.get(k)!r} (asked: {v!r})" for k, v in made_from.items()
                  if v is not None and meta.get(k) != v]
        if differ:
            raise DicompipeError(f"{path} was prepared from other settings: {'; '.join(differ)}. "
                                 "Give another --prepared file (it is written on first use).")
        n, s = z["images"].shape[0], z["images"].shape[-1]
        fields = [None] * n
        for i, bits in zip(z["normal_idx"], z["fields"]):
            fields[i] = np.unpackbits(bits)[:s * s].reshape(s, s).astype(bool)
        log(f"prepared data: {path} ({n} images)")
        return {"images": z["images"], "y": z["y"], "parts": list(z["parts"]),
                "normal_idx": z["normal_idx"], "labels": meta["labels"], "fields": fields}
    images, y, parts, normal_idx, labels = prepare_data(
        data, organ, split_file, workdir, extra_normals=extra_normals, log=log)
    fields = lesion_fields(images, normal_idx, organ, lesion_box)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**made_from, "labels": labels, "data": Path(data).name}
    np.savez_compressed(path, images=images, y=y, parts=np.array([p or "" for p in parts]),
                        normal_idx=normal_idx, meta=json.dumps(meta),
                        fields=np.stack([np.packbits(fields[i]) for i in normal_idx]))
    log(f"prepared data written: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return {"images": images, "y": y, "parts": parts, "normal_idx": normal_idx, "labels": labels,
            "fields": fields}


def _prepared_from(organ, lesion_box, split_file, extra_normals) -> dict:
    """What a prepared file depends on; None where this machine cannot tell (no split file)."""
    import hashlib
    split = Path(split_file) if split_file else None
    return {"organ": organ, "lesion_box": lesion_box,
            "split_sha256": hashlib.sha256(split.read_bytes()).hexdigest()
            if split and split.is_file() else None,
            "extra_normals": [series_name(e) for e in extra_normals]}


def series_name(path) -> str:
    """A series folder by its last two path parts (``/data/ct/abdomen/series`` ->
    ``abdomen/series``): the same series under another root on another machine.

    >>> series_name("/data/ct/abdomen/series")
    'abdomen/series'
    """
    return f"{Path(path).parent.name}/{Path(path).name}"


def check_device(device: str) -> None:
    """Refuse a training device torch cannot use, before any work.

    >>> check_device("cpu")
    """
    import torch

    from dicompipe.errors import DicompipeError
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DicompipeError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DicompipeError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU on "
                             "this machine; train with --device cpu (the default).")


def run_lesion_training(data, organ: str, split_file, workdir, phases, *, threads: int = 2,
                        cam_weight: float = 1.0, lr: float = 2e-3, init=None,
                        layer4_dilation: int = 1, abnormal_top: float = 0.0,
                        extra_normals=(), real_share: float = 0.5,
                        lesion_box: float = 0.2, bf16: bool = False, device: str = "cpu",
                        workers: int = 0, prepared=None, bs: int = 32,
                        input_region: str | None = None, region_dropout: float = 0.0,
                        log=print) -> dict:
    """Set up the data (:func:`prepare_data`, or :func:`prepared_data` when ``prepared``
    names an .npz) and run :func:`dicompipe.train.pretrain.train_lesions`; resumable from
    ``workdir``."""
    from dicompipe.train.pretrain import train_lesions
    from dicompipe.train.train import check_bf16
    check_device(device)
    state = Path(workdir) / "state.json"
    finished = state.exists() and json.loads(state.read_text())["phase"] >= len(phases)
    if bf16 and device == "cpu" and not finished:   # finishing a GPU run's bundle trains nothing
        check_bf16()
    fields = None
    if prepared:
        d = prepared_data(prepared, data, organ, split_file, Path(workdir).parent,
                          extra_normals=extra_normals, lesion_box=lesion_box, log=log)
        images, y, parts, normal_idx, labels, fields = (d[k] for k in (
            "images", "y", "parts", "normal_idx", "labels", "fields"))
    else:
        images, y, parts, normal_idx, labels = prepare_data(
            data, organ, split_file, Path(workdir).parent, extra_normals=extra_normals, log=log)
    return train_lesions(images, y, parts, normal_idx, labels, spec_v2(organ, input_region=input_region), workdir,
                         organ=organ, phases=phases, threads=threads, cam_weight=cam_weight, lr=lr, init=init,
                         flip=True, vflip=organ == "pancreas", layer4_dilation=layer4_dilation,
                         abnormal_top=abnormal_top, real_share=real_share, lesion_box=lesion_box,
                         bf16=bf16, device=device, workers=workers, fields=fields, bs=bs,
                         region_dropout=region_dropout, log=log)


def fit_prior_bias(logits: np.ndarray, y: np.ndarray, positive: int | None = None,
                   min_sensitivity: float = 0.9, span: float = 4.0, step: float = 0.1) -> np.ndarray:
    """Logit offsets (class 0 fixed at 0) that maximise balanced accuracy on validation,
    among those keeping the ``positive`` class's sensitivity >= ``min_sensitivity`` when any
    does; ties go to the smallest offsets. A prior correction: the class-balanced training
    sampler and the deployment prior differ, and argmax then follows AUROC.

    >>> b = fit_prior_bias(val_logits, val_y, positive=2)
    """
    k = logits.shape[1]
    grid = np.arange(-span, span + step / 2, step)
    best, best_key = np.zeros(k), None
    for offs in np.array(np.meshgrid(*[grid] * (k - 1), indexing="ij")).reshape(k - 1, -1).T:
        b = np.concatenate([[0.0], offs])
        pred = (logits + b).argmax(1)
        sens = [float((pred[y == c] == c).mean()) for c in range(k) if (y == c).any()]
        ok = positive is None or float((pred[y == positive] == positive).mean()) >= min_sensitivity
        key = (ok, round(float(np.mean(sens)), 6), -float(np.abs(b).sum()))
        if best_key is None or key > best_key:
            best, best_key = b, key
    return best


def rendered_split(data, organ: str, split_file, spec, workdir="training", log=print):
    """(images uint8 rendered with ``spec``, labels y, part per image ("" when in none),
    label names) of ``data`` under a stored split (a bundle's docs/split.json); the
    rendering is cached in ``workdir`` (``cache_v2_<organ>_<size>[_<input region>].npz``).

    >>> images, y, parts, labels = rendered_split("iq-othnccd", "lung", "split.json", spec)
    """
    from dicompipe.train import data as D
    items, labels = D.scan(data, organ)
    region = f"_{spec.input_region}" if spec.input_region else ""
    images = D.build_cache(items, spec, Path(workdir) / f"cache_v2_{organ}_{spec.size}{region}.npz", log=log)
    stored = json.loads(Path(split_file).read_text())["parts"]
    parts = np.array([stored.get(os.path.relpath(it.path, data)) or "" for it in items])
    return images, np.array([it.label for it in items]), parts, labels


def finalize_bundle(weights, organ: str, data, split_file, out, *, size: int, version: str,
                    training: dict, workdir="training", calibrate_on: str = "val",
                    n_boot: int = 1000, log=print) -> tuple[Path, dict]:
    """A 2.x bundle from trained ``weights``: the data rendered at ``size`` exactly as
    inference renders it, a prior correction (:func:`fit_prior_bias`, folded into the
    head's bias, so every backend applies it) and a temperature fitted on the validation
    part, leak-free test metrics with bootstrap intervals. Returns (bundle folder, metrics).
    The architecture (layer4 dilation, evidence pooling) and the input region are what the
    weights file's metadata says (:func:`dicompipe.train.pretrain.train_lesions` records
    them), else the standard ResNet50's on the whole body.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dicompipe.model.bundle import save_bundle
    from dicompipe.model.network import resnet50
    from dicompipe.train import data as D
    from dicompipe.train.calibration import calibrate
    from dicompipe.train.metrics import classification_metrics
    from dicompipe.train.train import predict_logits
    from dicompipe.types import softmax
    with safe_open(str(weights), "pt") as f:
        arch = f.metadata() or {}
    spec = replace(spec_v2(organ, size, arch.get("input_region") or None),
                   region_margin=float(arch.get("region_margin", 0.05)))
    images, y, parts, labels = rendered_split(data, organ, split_file, spec, workdir, log=log)
    stored = json.loads(Path(split_file).read_text())
    layer4_dilation, abnormal_top = int(arch.get("layer4_dilation", 1)), float(arch.get("abnormal_top", 0))
    net = resnet50(len(labels), layer4_dilation=layer4_dilation, abnormal_top=abnormal_top)
    net.load_state_dict(load_file(str(weights)))
    torch.set_num_threads(2)
    va, te = parts == "val", parts == "test"
    lv, lt = predict_logits(net, images[va], spec), predict_logits(net, images[te], spec)
    pos = labels.index(D.positive_of(organ)[0])
    bias = fit_prior_bias(lv, y[va], positive=pos)
    T, how = calibrate(lv + bias, y[va])
    with torch.no_grad():
        net.fc.bias += torch.as_tensor(bias, dtype=net.fc.bias.dtype)
    val = classification_metrics(y[va], softmax((lv + bias) / T, np.float64), labels, n_boot=200,
                                 probs_uncal=softmax(lv + bias, np.float64))
    test = classification_metrics(y[te], softmax((lt + bias) / T, np.float64), labels, n_boot=n_boot,
                                  probs_uncal=softmax(lt + bias, np.float64))
    md = {
        "name": f"{organ}-resnet50", "version": version, "task": "classification", "organ": organ,
        "labels": labels, "positive_labels": D.positive_of(organ),
        "network": {"arch": "resnet50", "in_channels": spec.channels, "conv1_t_stride": 2,
                    "layer4_dilation": layer4_dilation,
                    **({"abnormal_top": abnormal_top} if abnormal_top else {})},
        "preprocessing": spec.to_dict(),
        "aggregation": {"rule": "topk_mean", "k": 5, "uncertain_band": [0.4, 0.6]},
        "calibration": {"temperature": T, "method": how + " after a prior correction",
                        "prior_bias_folded_into_head": [round(float(b), 3) for b in bias],
                        "fitted_on": f"{Path(data).name} validation part ({int(va.sum())} slices, "
                                     "8-bit exports rendered exactly as inference renders them)"},
        "trained": True,
        "training": {"data": Path(data).name, "citation": organs.get(organ).training.citation,
                     "split": {**stored.get("info", {}), "source": "the 1.0.0 bundle's stored split"},
                     **training},
        "metrics": {"validation_calibrated": val, "leak_free_test": test,
                    "evaluated_on": Path(data).name},
        "intended_use": "Research use only: not for clinical diagnosis or treatment decisions.",
    }
    folder = save_bundle(out, net, md, dtype="float16")
    (Path(folder) / "docs" / "split.json").write_text(Path(split_file).read_text())
    log(f"bundle {folder}: T {T:.3f}, bias {bias.round(2).tolist()}, test macro AUROC "
        f"{test['macro_auroc']:.3f}, balanced accuracy {test['balanced_accuracy']:.3f}")
    return Path(folder), {"validation": val, "test": test}
