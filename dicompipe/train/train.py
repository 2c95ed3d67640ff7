"""``dicompipe train DATA --organ lung|pancreas --out BUNDLE``: train a ResNet50 bundle.

Every image is rendered once with the inference renderer
(:func:`dicompipe.preprocess.render.render`, square padding, so image size cannot give the
class away) into a uint8 cache; epochs then cost only the network. Leak-free
train/val/test split (:func:`make_split`), class-balanced sampling, augmentation of the
cached slices, AdamW with a one-cycle schedule, a low-resolution phase followed by epochs
at the shipped size, best epoch by validation macro AUROC, a resumable checkpoint every
epoch, temperature scaling on validation. The test part is never touched here.

Example::

    dicompipe train IQ-OTH_NCCD/ --organ lung --out my-lung \\
        --sizes 128x8,224x2 --workdir training/lung
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dicompipe import organs
from dicompipe.errors import DicompipeError
from dicompipe.model.network import resnet50
from dicompipe.train import data as D
from dicompipe.train import splits as S
from dicompipe.train.calibration import calibrate
from dicompipe.train.metrics import classification_metrics, macro_auroc
from dicompipe.types import PreprocessSpec, softmax

# The HU window (level, width) under which a DICOM series looks like the training JPGs
# (organ registry, training.windows), measured by matching tissue levels (see the bundles'
# docs/README.md): IQ-OTH/NCCD lungs black, fat ~160, muscle ~215 of 255 -> (-200, 700) on
# LIDC-IDRI-0001; Kaggle pancreas fat ~115, soft tissue ~145, lung ~0-20 -> (-40, 1640) on the
# abdomen series (quantile fit, rmse 8 grey levels). One grey window replicated to 3 channels,
# like the 1-channel training images.


def default_windows(organ: str) -> list[tuple[float, float]]:
    """The organ's HU windows for DICOM input of a 1.x bundle (organ registry)."""
    return [(float(lv), float(w)) for lv, w in organs.get(organ).training.windows]


FRACTIONS = (0.65, 0.15, 0.20)


# --------------------------------------------------------------------------- split
def make_split(organ: str, items: list[D.Item], images: np.ndarray, seed: int = 0,
               fractions=FRACTIONS, dup_mad: float = 0.2, group_mad: float = 2.0) -> tuple[list, dict]:
    """Leak-free parts ("train"/"val"/"test"/None) per item, and a description.

    - patient IDs present: group split by patient;
    - numbered files without IDs (IQ-OTH/NCCD): exact duplicates removed, contiguous file
      number blocks per class with cuts at the least similar neighbours, then any
      near-duplicate group (phash <= 2 bits) spanning parts moved whole to the earliest;
    - otherwise (Kaggle pancreas): web pictures (< 400 px side) dropped, exact and near
      duplicates (24x24 thumbnail mean abs difference < ``dup_mad`` grey levels) collapsed,
      images under both labels dropped, content groups = connected components of thumbnail
      distance < ``group_mad`` (neighbouring slices), group split.
    """
    y = np.array([it.label for it in items])
    n = len(items)
    keep = np.ones(n, bool)
    info: dict = {"fractions": list(fractions), "seed": seed}
    h = S.phash(images)
    if all(it.group for it in items):
        parts = S.group_split([it.group for it in items], y, fractions, seed)
        info["method"] = "group split by patient ID"
        return parts, info
    if organ == "lung" and all(it.number is not None for it in items):
        seen: dict = {}
        for i in range(n):
            k = (y[i], images[i].tobytes())
            if k in seen:
                keep[i] = False
            seen.setdefault(k, i)
        idx = np.nonzero(keep)[0]
        nums = [items[i].number for i in idx]
        sim = S.neighbour_similarity(images[idx], nums, y[idx])
        sub = S.block_split(nums, y[idx], fractions, similarity=sim)
        groups = S.near_duplicate_groups(h[idx], 2)
        sub = S.isolate(sub, groups)
        parts = [None] * n
        for j, i in enumerate(idx):
            parts[i] = sub[j]
        info.update(method="contiguous file-number blocks per class (cuts at least-similar "
                           "neighbours), exact duplicates removed, near-duplicate groups "
                           "(phash<=2) kept in one part",
                    exact_duplicates_removed=int((~keep).sum()))
        return parts, info
    # content-based (no IDs, no usable numbering)
    small = np.array([min(it.shape[:2]) < 400 if it.shape != (0, 0) else False for it in items])
    keep &= ~small
    idx = np.nonzero(keep)[0]
    t = torch.from_numpy(images[idx].astype(np.float32))[:, None]
    v = F.interpolate(t, size=(24, 24), mode="area")[:, 0].reshape(len(idx), -1).numpy()
    dist = np.zeros((len(idx), len(idx)), np.float32)
    for a in range(0, len(idx), 32):
        dist[a:a + 32] = np.abs(v[a:a + 32, None] - v[None]).mean(2)
    # duplicates: greedy, each image against the images kept before it (no chaining)
    rep = -np.ones(len(idx), int)
    kept: list[int] = []
    for j in range(len(idx)):
        if kept:
            d = dist[j, kept]
            m = int(np.argmin(d))
            if d[m] < dup_mad:
                rep[j] = kept[m]
                continue
        kept.append(j)
    bad = set()
    for j in range(len(idx)):
        if rep[j] >= 0 and y[idx[j]] != y[idx[rep[j]]]:
            bad.add(int(rep[j]))
    conflicting = sum(1 for j in range(len(idx)) if (rep[j] in bad) or (j in bad))
    keep2 = np.array([rep[j] < 0 and j not in bad for j in range(len(idx))])
    dups = int((rep >= 0).sum())
    sel = np.nonzero(keep2)[0]
    groups = S.components(dist[np.ix_(sel, sel)] < group_mad)
    idx = idx[sel]
    sub = S.group_split(groups, y[idx], fractions, seed)
    parts = [None] * n
    for j, i in enumerate(idx):
        parts[i] = sub[j]
    info.update(method=f"dedup (exact + near: 24x24 thumbnail mean abs diff < {dup_mad} grey "
                       "levels), images under both labels dropped, web pictures (<400 px) "
                       "dropped, split by content groups (connected components of 24x24 "
                       f"mean abs diff < {group_mad} grey levels: neighbouring slices)",
                small_pictures_removed=int(small.sum()), duplicates_removed=int(dups),
                conflicting_label_images_removed=int(conflicting),
                content_groups=int(len(np.unique(groups))),
                largest_group=int(np.bincount(groups).max()))
    return parts, info


def load_data(data, organ, label_map=None, spec=None, workdir="training", log=print, size=224):
    spec = spec or PreprocessSpec(windows=default_windows(organ), size=size)
    items, labels = D.scan(data, organ, label_map)
    import hashlib
    tag = f"{organ}_{hashlib.sha1(str(Path(data).resolve()).encode()).hexdigest()[:8]}"
    images = D.build_cache(items, spec, Path(workdir) / f"cache_{tag}.npz", log=log)
    return items, labels, images, spec


# --------------------------------------------------------------------------- loop
def parse_sizes(text: str) -> list[int]:
    """"128x8,224x2" -> [128]*8 + [224]*2."""
    out = []
    for part in text.split(","):
        s, _, k = part.partition("x")
        out += [int(s)] * int(k or 1)
    return out


def autocast(bf16: bool, device: str = "cpu"):
    """The training forward's precision: bfloat16 autocast when ``bf16`` (on the CPU about
    2x the images per second with AVX512-BF16 or AMX, ``benchmarks.train_speed``;
    emulated, hence slower, elsewhere: :func:`check_bf16`), else a no-op context.

    >>> with autocast(True):
    ...     logits = net(x)          # conv/matmul in bf16; take ``.float()`` for the loss
    """
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_bf16() -> None:
    """Refuse ``--bf16`` on a CPU without native bfloat16 (oneDNN would emulate it, slower
    than float32)."""
    if not native_bf16():
        raise DicompipeError("--bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so "
                         "bf16 training would be slower than float32; train without --bf16.")


@torch.no_grad()
def predict_logits(net, images_u8: np.ndarray, spec, size=None, bs=32, device="cpu") -> np.ndarray:
    net.eval()
    out = []
    for a in range(0, len(images_u8), bs):
        x = D.to_input(torch.from_numpy(images_u8[a:a + bs]).to(device), spec, size or spec.size)
        out.append(net(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1))


def _save_ckpt(path, net, opt, sched, state):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "last.tmp"))
    os.replace(path / "last.tmp", path / "last.safetensors")
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, path / "opt.tmp")
    os.replace(path / "opt.tmp", path / "opt.pt")
    (path / "state.json").write_text(json.dumps(state, indent=1))


def train(images, y, parts, labels, spec, sizes, workdir, seed=0, lr=2e-3, bs=32,
          flip=False, resume=False, log=print, threads=2, patience=None, budget_s=None,
          low_size=112, switch=0.7, label_smoothing=0.1, bf16=False):
    """Train; returns (best state dict, history). Checkpoints/log under ``workdir``.

    ``sizes``: training image size per epoch (one-cycle LR over all of them). With
    ``budget_s`` instead, training runs on the clock: ``low_size`` for the first ``switch``
    fraction of the budget, then ``spec.size``; LR warm-up then cosine decay over the
    budget's time; it stops at the first epoch end past the budget. The network starts
    with zero-initialised residual gammas; the loss uses ``label_smoothing``; ``bf16``:
    forward and backward in bfloat16 autocast (:func:`autocast`).
    """
    from safetensors.torch import load_file, save_file
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    wd = Path(workdir)
    tr = np.array([p == "train" for p in parts])
    va = np.array([p == "val" for p in parts])
    xt, yt = images[tr], y[tr]
    xv, yv = images[va], y[va]
    k = len(labels)
    net = resnet50(k, zero_init_residual=True).to(memory_format=torch.channels_last)
    steps_per_epoch = max(1, len(xt) // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    if budget_s:
        sizes = [0] * 10_000
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps_per_epoch * len(sizes),
                                                pct_start=0.15)
    state = {"epoch": 0, "history": [], "best": -1.0, "best_epoch": None, "seconds": 0.0,
             "budget_s": budget_s}
    if resume and (wd / "state.json").exists():
        state = json.loads((wd / "state.json").read_text())
        net.load_state_dict(load_file(str(wd / "last.safetensors")))
        o = torch.load(wd / "opt.pt", weights_only=True)
        opt.load_state_dict(o["opt"])
        sched.load_state_dict(o["sched"])
        log(f"resumed at epoch {state['epoch']}")
    aug = D.Augment(flip=flip, seed=seed + 1000 * state["epoch"])
    w = 1.0 / np.bincount(yt, minlength=k)[yt]
    w /= w.sum()
    rng = np.random.default_rng(seed + state["epoch"])
    for ep in range(state["epoch"], len(sizes)):
        if budget_s and state["seconds"] >= budget_s:
            break
        size = sizes[ep]
        net.train()
        t0 = time.time()
        order = rng.choice(len(xt), size=steps_per_epoch * bs, replace=True, p=w)   # class-balanced
        tot = 0.0
        for s in range(steps_per_epoch):
            b = order[s * bs:(s + 1) * bs]
            if budget_s:
                frac = (state["seconds"] + time.time() - t0) / budget_s
                if frac >= 1.0 and s > 0:
                    break
                size = low_size if frac < switch else spec.size
                f = min(frac / 0.08, 1.0) if frac < 0.08 else \
                    0.5 * (1 + math.cos(math.pi * min(1.0, (frac - 0.08) / 0.92)))
                for gr in opt.param_groups:
                    gr["lr"] = lr * max(f, 0.01)
            x = aug(torch.from_numpy(xt[b]), spec, size)
            with autocast(bf16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), torch.from_numpy(yt[b]).long(),
                                   label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not budget_s:
                sched.step()
            tot += float(loss.detach())
            if (s + 1) % 5 == 0 or s + 1 == steps_per_epoch:
                el = time.time() - t0
                log(f"epoch {ep + 1}/{len(sizes)} size {size} step {s + 1}/{steps_per_epoch} "
                    f"loss {tot / (s + 1):.4f} {(s + 1) * bs / el:.2f} img/s")
        steps_done = s + 1 if steps_per_epoch else 0
        train_s = time.time() - t0
        lv = predict_logits(net, xv, spec)
        pv = softmax(lv, np.float64)
        auc = macro_auroc(yv, pv)
        vloss = float(F.cross_entropy(torch.from_numpy(lv), torch.from_numpy(yv).long()))
        bacc = classification_metrics(yv, pv, labels, n_boot=0)["balanced_accuracy"]
        rec = {"epoch": ep + 1, "size": size, "train_loss": tot / max(1, steps_done), "steps": steps_done,
               "val_loss": vloss,
               "val_macro_auroc": auc, "val_balanced_accuracy": bacc, "train_seconds": train_s,
               "seconds": time.time() - t0}
        state["history"].append(rec)
        state["seconds"] += rec["seconds"]
        state["epoch"] = ep + 1
        score = auc - 1e-3 * vloss
        if score >= state["best"]:
            state["best"], state["best_epoch"] = score, ep + 1
            save_file({kk: v.contiguous() for kk, v in net.state_dict().items()}, str(wd / "best.tmp"))
            os.replace(wd / "best.tmp", wd / "best.safetensors")
        log("VAL " + json.dumps(rec))
        _save_ckpt(wd, net, opt, sched, state)
        if patience and state["best_epoch"] and ep + 1 - state["best_epoch"] >= patience:
            log(f"early stop: no val improvement for {patience} epochs")
            break
    return load_file(str(wd / "best.safetensors")), state


def _hardware() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, "
            f"torch {torch.__version__}")


def train_bundle(data: str | Path, organ: str, out: str | Path, *, epochs: int | None = None,
                 sizes: str | None = None, budget_minutes: float | None = None,
                 low_size: int = 112, lr: float = 2e-3, resume: bool = False,
                 label_map: str | None = None, seed: int = 0, threads: int = 2,
                 workdir: str | Path | None = None, size: int = 224,
                 patience: int | None = None, bf16: bool = False) -> Path:
    """Train a 1.x ResNet50 bundle for ``organ`` on ``data`` and write it to ``out``; returns
    the bundle folder (``dicompipe train`` without ``--pretrain``).

    ``sizes``: image size per epoch ("128x8,224x2"; default from ``epochs``, 10: 8 at 128 px,
    2 at 224 px); ``budget_minutes``: train on the clock instead (``low_size`` px for the
    first 70 %); ``workdir``: checkpoints, cache and log (default ``training/<organ>``);
    ``bf16``: bfloat16 autocast (refused on a CPU without native bf16).

    >>> train_bundle("IQ-OTH_NCCD/", "lung", "my-lung", sizes="128x8,224x2")
    PosixPath('my-lung')
    """
    from dicompipe.model.bundle import save_bundle
    if bf16:
        check_bf16()
    workdir = Path(workdir or Path("training") / organ)
    workdir.mkdir(parents=True, exist_ok=True)
    logf = open(workdir / "train.log", "a")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    lm = D.parse_label_map(label_map)
    items, labels, images, spec = load_data(data, organ, lm, workdir=workdir.parent, log=log,
                                           size=int(size or 224))
    y = np.array([it.label for it in items])
    seed = int(seed or 0)
    parts, split_info = make_split(organ, items, images, seed)
    log("split " + json.dumps({"info": split_info, "counts": S.summary(parts, y, labels)}))
    (workdir / "split.json").write_text(json.dumps(
        {"info": split_info,
         "parts": {os.path.relpath(it.path, data): p for it, p in zip(items, parts)}}, indent=0))
    size_list = parse_sizes(sizes or f"128x{max(1, (epochs or 10) - 2)},224x2")
    budget = budget_minutes
    lr = float(lr or 2e-3)
    low_size = int(low_size or 112)
    t0 = time.time()
    best, state = train(images, y, parts, labels, spec, size_list, workdir, seed=seed, lr=lr,
                        flip=organs.get(organ).training.flip, resume=bool(resume),
                        log=log, patience=patience, threads=int(threads or 2),
                        budget_s=budget * 60 if budget else None, low_size=low_size, bf16=bf16)
    net = resnet50(len(labels))
    net.load_state_dict(best)
    va = np.array([p == "val" for p in parts])
    lv = predict_logits(net, images[va], spec)
    T, cal_method = calibrate(lv, y[va])
    val = classification_metrics(y[va], softmax(lv / T, np.float64), labels, n_boot=200,
                                 probs_uncal=softmax(lv, np.float64))
    log(f"temperature {T:.3f}; val (calibrated) " + json.dumps(
        {k: v for k, v in val.items() if not isinstance(v, (list, dict))}))
    md = {
        "name": f"{organ}-resnet50", "version": "1.0.0", "task": "classification", "organ": organ,
        "labels": labels, "positive_labels": D.positive_of(organ),
        "network": {"arch": "resnet50", "in_channels": spec.channels, "conv1_t_stride": 2},
        "preprocessing": spec.to_dict(),
        "aggregation": {"rule": "topk_mean", "k": 5, "uncertain_band": [0.4, 0.6]},
        "calibration": {"temperature": T, "method": cal_method},
        "trained": True,
        "training": {"data": Path(data).name,   # the folder's name: no machine paths
                     "citation": organs.get(organ).training.citation,
                     "split": {**split_info, "counts": S.summary(parts, y, labels)},
                     "epochs": state["epoch"], "best_epoch": state["best_epoch"],
                     "sizes": size_list if not budget else
                     f"time budget {budget} min: {low_size} px for 70%, then {spec.size}",
                     "seconds": round(time.time() - t0 + 0.0, 1),
                     "train_seconds_total": round(state["seconds"], 1),
                     "hardware": _hardware(),
                     "optimizer": (f"AdamW lr {lr:g} wd 0.05, "
                                   "label smoothing 0.1, zero-init residual gammas, "
                                   + ("warm-up 8% then cosine decay on the clock" if budget else "one-cycle")
                                   + (", bfloat16 autocast" if bf16 else "")),
                     "batch_size": 32, "sampling": "class-balanced", "history": state["history"]},
        "metrics": {"validation_calibrated": val},
        "intended_use": "Research use only: not for clinical diagnosis or treatment decisions.",
    }
    written = save_bundle(out, net, md, dtype="float16")
    (Path(written) / "docs" / "split.json").write_text((workdir / "split.json").read_text())
    log(f"bundle written: {written}")
    return Path(written)
