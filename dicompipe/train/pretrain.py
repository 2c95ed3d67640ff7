"""Synthetic-lesion pretraining, then fine-tuning on the real labels, with a location loss.

Phases (each on the clock, resumable from ``workdir`` after any interruption):

1. ``pretrain``: lesion-free training slices with synthetic lesions
   (:mod:`dicompipe.train.lesions`): normal / benign-like / malignant-like (lung) or
   normal / tumour (pancreas); every base slice appears once per class in a batch, so the
   lesion is the only thing that tells the copies apart (without these pairs a ResNet50
   from scratch stayed at chance for 9,000 images). Loss: cross-entropy + ``cam_weight`` x a per-cell BCE that
   makes the layer4 class map (``w_c . A_ij + b_c``, whose mean over cells is the class
   logit, i.e. the Grad-CAM map of a GAP + linear head) match the lesion mask; on a
   lesion-free slice every abnormal class's map is pushed below zero. The weights at the
   end of each phase are kept (``phase<i>_<name>.safetensors``): the last pretrain phase's
   are the *synthetic-only* model.
2. ``finetune`` (optional): a share ``real_share`` (default half) of each batch real
   labelled training slices (class-balanced, cross-entropy only), the rest synthetic (both
   losses), lower learning rate.
   ``finetune-l4`` trains only layer4 and the head (the earlier layers keep the lesion
   filters the synthetic phase learned), ``finetune-head`` only the head.

Example::

    >>> state = train_lesions(images, y, parts, normal_idx, labels, spec, "training/lung2",
    ...                       organ="lung", phases=[("pretrain", 40, 128), ("finetune", 20, 160)])
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dicompipe.model.network import cell_logits, forward_with_features, resnet50
from dicompipe.preprocess.render import keep_region, region_mask
from dicompipe.train import data as D
from dicompipe.train import lesions as L
from dicompipe.train.metrics import macro_auroc
from dicompipe.train.train import autocast
from dicompipe.types import softmax


def synth_batch(images: np.ndarray, fields: list[np.ndarray], idx: np.ndarray, organ: str,
                n_classes: int, rng, spec=None,
                region_p: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (n, s, s) float, labels (n,), masks (n, s, s) from lesion-free ``images[idx]``:
    an equal share of every class; a slice where no lesion fits stays normal. With a
    ``spec`` that has an ``input_region``, each image (lesion drawn) is then seen through
    it, as inference sees a slice, and the lesion mask keeps only what remains visible;
    ``region_p`` < 1: only that share of the images, drawn at random (region dropout)."""
    out, ys, ms = [], [], []
    for j, i in enumerate(idx):
        img = images[i].astype(np.float32) / 255.0
        cls = j % n_classes
        res = None
        if cls and organ == "lung":
            res = L.insert_lung_lesion(img, fields[i], "benign" if cls == 1 and n_classes == 3
                                       else "malignant", rng)
        elif cls:
            res = L.insert_pancreas_lesion(img, fields[i], rng)
        img, lesion = (img, np.zeros(img.shape, bool)) if res is None else res
        keep = region_mask(img, spec) if spec is not None and (
            region_p >= 1 or rng.random() < region_p) else None
        if keep is not None:
            img, lesion = img * keep, lesion & keep
        out.append(img), ys.append(cls if lesion.any() else 0), ms.append(lesion)
    return np.stack(out), np.array(ys), np.stack(ms)


_WORKER: dict = {}      # what synthesis processes inherit at fork: images, fields, organ, k


def _synth_u8(task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthesis process's job: :func:`synth_batch` for (indices, seed), images as uint8
    (a quarter of the bytes to send back; the inputs are 8-bit renderings anyway)."""
    idx, seed = task
    w = _WORKER
    img, ys, ms = synth_batch(w["images"], w["fields"], idx, w["organ"], w["k"],
                              np.random.default_rng(seed), w.get("spec"), w.get("region_p", 1.0))
    return np.rint(img * 255).astype(np.uint8), ys, ms


class SynthFeed:
    """Synthetic batches made ahead by ``workers`` processes (fork).

    Synthesis is numpy/scipy on one core per batch; on a GPU it is the bottleneck, so the
    pool keeps ``2 * workers`` batches in flight. Create it before CUDA is initialised.

    >>> feed = SynthFeed(images, fields, "lung", 3, workers=8, spec=spec)
    >>> img_u8, y, masks = feed.next(lambda: (base_idx, seed))   # an earlier request's batch
    """

    def __init__(self, images, fields, organ: str, k: int, workers: int, spec=None,
                 region_p: float = 1.0):
        import multiprocessing as mp
        _WORKER.update(images=images, fields=fields, organ=organ, k=k, spec=spec, region_p=region_p)
        self.pool, self.pending, self.depth = mp.get_context("fork").Pool(workers), [], 2 * workers

    def next(self, make_task):
        """The next batch; ``make_task()`` -> (indices, seed) draws a request (called
        enough times to keep the pool full)."""
        while len(self.pending) < self.depth:
            self.pending.append(self.pool.apply_async(_synth_u8, (make_task(),)))
        return self.pending.pop(0).get()

    def drain(self):
        """Drop the batches in flight (their size belongs to the phase that ended)."""
        for r in self.pending:
            r.wait()
        self.pending = []

    def close(self):
        self.pool.terminate()


def location_loss(cells: torch.Tensor, masks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE of the abnormal classes' cell maps against the lesion mask: the most covered cell
    of a lesion slice -> 1, the others in proportion to their cover (a lesion a few pixels
    wide still has a cell that holds it); lesion-free slices: every abnormal map -> 0."""
    n, k, h, w = cells.shape
    cover = F.adaptive_avg_pool2d(masks, (h, w))[:, 0]             # (n, h, w)
    target = cover / cover.amax((1, 2), keepdim=True).clamp_min(1e-6)
    losses = []
    for c in range(1, k):
        sel = (y == c) | (y == 0)
        if sel.any():
            t = torch.where((y[sel] == c)[:, None, None], target[sel], torch.zeros_like(target[sel]))
            # lesion cells are few: weight them up so the map learns where, not only "nowhere"
            losses.append(F.binary_cross_entropy_with_logits(cells[sel, c], t, weight=1 + 9 * t))
    return torch.stack(losses).mean() if losses else cells.sum() * 0


@torch.no_grad()
def synthetic_check(net, images, y, masks, spec, size, device="cpu") -> dict:
    """AUROC (any lesion vs none) and the share of lesion slices whose predicted class's
    CAM peak lies in the lesion mask, on fixed synthetic slices."""
    net.eval()
    probs, hits, n_les = [], 0, 0
    for a in range(0, len(images), 32):
        x = D.to_input(torch.from_numpy(images[a:a + 32]).to(device), spec, size)
        logits, feat = forward_with_features(net, x)
        probs.append(softmax(logits.float().cpu().numpy(), np.float64))
        cells = cell_logits(net, feat).relu()
        up = F.interpolate(cells, size=images.shape[-2:], mode="bilinear", align_corners=False).cpu()
        for j in range(len(x)):
            c = int(y[a + j])
            if c == 0:
                continue
            m = up[j, c].numpy()
            py, px = np.unravel_index(int(np.argmax(m)), m.shape)
            n_les += 1
            hits += bool(masks[a + j][py, px])
    p = np.concatenate(probs)
    les = (y > 0).astype(int)
    auc = macro_auroc(les, np.stack([p[:, 0], 1 - p[:, 0]], 1))
    return {"synthetic_auroc_lesion_vs_none": float(auc), "cam_peak_in_lesion": hits / max(1, n_les)}


#: trainable parameter prefixes per fine-tuning variant (None: all)
TRAINABLE = {"finetune-l4": ("layer4.", "fc."), "finetune-head": ("fc.",)}


def set_trainable(net, phase: str) -> list[torch.nn.Module]:
    """Freeze what ``phase`` keeps fixed; returns the frozen modules (kept in eval mode so
    their BatchNorm statistics stay those of the earlier phase)."""
    keep = TRAINABLE.get(phase)
    for name, prm in net.named_parameters():
        prm.requires_grad_(keep is None or name.startswith(keep))
    if keep is None:
        return []
    return [m for name, m in net.named_children() if not any(k.startswith(name + ".") for k in keep)]


def train_mode(net, frozen) -> None:
    """``net.train()`` with the ``frozen`` modules kept in eval mode."""
    net.train()
    for m in frozen:
        m.eval()


def train_lesions(images: np.ndarray, y: np.ndarray, parts: list, normal_idx: np.ndarray,
                  labels: list[str], spec, workdir, *, organ: str,
                  phases=(("pretrain", 40.0, 128),), lr: float = 1e-3, bs: int = 32,
                  cam_weight: float = 1.0, flip: bool = False, vflip: bool = False,
                  threads: int = 2, seed: int = 0, eval_every_min: float = 10.0,
                  init: Path | None = None, layer4_dilation: int = 1, abnormal_top: float = 0.0,
                  real_share: float = 0.5,
                  lesion_box: float = 0.2, bf16: bool = False, device: str = "cpu",
                  workers: int = 0, fields: list | None = None, region_dropout: float = 0.0,
                  log=print) -> dict:
    """Run the phases; returns the state (history of checks). Resumes from ``workdir``.

    ``images`` uint8 (n, s, s) rendered slices; ``normal_idx`` the lesion-free training
    slices; ``parts`` "train"/"val"/"test"/None per image (real labels ``y``).
    ``lesion_box``: pancreas lesions are drawn in soft tissue within this half-width (a
    fraction of the crop) around the centre; 0.45 = nearly the whole body, so that only a
    lesion's appearance, not its place, tells where it is.
    ``bf16``: the network's forward and backward in bfloat16 autocast (:func:`autocast`);
    weights, optimiser and losses stay float32.
    ``device``: where the network trains ("cuda" on a GPU machine); ``workers``: processes
    that synthesise lesion batches ahead (:class:`SynthFeed`; 0 = in this process, as on
    2 CPU cores). ``fields``: the lesion regions per image (:func:`lesion_fields`), when
    already computed. ``abnormal_top``: evidence pooling of the abnormal logits
    (:func:`dicompipe.model.network.class_logits`; 0 = global average).
    ``region_dropout``: the share of training slices (real and synthetic) shown through the
    lung fields only while ``spec`` keeps the whole body: context dropped at random, so the
    network must also find the tumour without it; inference and validation see the spec's
    input unchanged.
    """
    from safetensors.torch import load_file, save_file
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    k = len(labels)
    parts = np.array([p or "" for p in parts])
    if fields is None:
        fields = lesion_fields(images, normal_idx, organ, lesion_box)
    usable = np.array([i for i in normal_idx if fields[i].any()])
    val_normals = np.array([i for i in usable if parts[i] == "val"])
    # every lesion-free training slice is a base, also those with no room for a lesion (a
    # lung base under the diaphragm dome): their copies all stay normal, hard negatives
    train_normals = np.array([i for i in normal_idx if parts[i] == "train"])
    log(f"lesion-free slices: train {len(train_normals)} ({sum(fields[i].any() for i in train_normals)} "
        f"with room for a lesion), val {len(val_normals)} with room")
    vrng = np.random.default_rng(12345)
    reps = max(1, 150 // max(1, len(val_normals)))
    v_idx = np.concatenate([val_normals] * reps)
    sv_img, sv_y, sv_m = synth_batch(images, fields, v_idx, organ, k, vrng, spec)
    # real slices as the network sees them (lesions go into the whole slice, then the region)
    seen = np.stack([keep_region(im, spec) for im in images]) if spec.input_region else images
    drop_spec, drop_p = spec, 1.0
    if region_dropout > 0:
        if spec.input_region:
            raise ValueError("region dropout is for a spec that keeps the whole body")
        drop_spec, drop_p = replace(spec, input_region="lung_fields"), region_dropout
        dropped = np.stack([keep_region(im, drop_spec) for im in images])

    feed = SynthFeed(images, fields, organ, k, workers, drop_spec, drop_p) if workers else None   # before CUDA
    net = resnet50(k, zero_init_residual=True, layer4_dilation=layer4_dilation, abnormal_top=abnormal_top)
    if init is not None:
        # the head too when its classes match (it is half of the class map); not from
        # another organ's network (e.g. the lung lesion network for the pancreas)
        sd = load_file(str(init))
        head = sd["fc.weight"].shape == net.fc.weight.shape
        net.load_state_dict(sd if head else {kk: v for kk, v in sd.items() if not kk.startswith("fc.")},
                            strict=head)
        log(f"{'network' if head else 'backbone'} initialised from {Path(init).name}")
    net = net.to(device, memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    state = {"phase": 0, "phase_seconds": 0.0, "step": 0, "history": [], "best": -1.0}
    if (wd / "state.json").exists():
        state = json.loads((wd / "state.json").read_text())
        net.load_state_dict(load_file(str(wd / "last.safetensors"), device=str(device)))
        if (wd / "opt.pt").exists():          # absent when only a finished run's weights came back
            opt.load_state_dict(torch.load(wd / "opt.pt", weights_only=True, map_location=device)["opt"])
        log(f"resumed: phase {state['phase']}, {state['phase_seconds']:.0f} s into it, step {state['step']}")
    aug = D.Augment(flip=flip, vflip=vflip, seed=seed + state["step"], noise=0.04, blur_p=0.4)
    rng = np.random.default_rng(seed + state["step"])
    real_tr = np.nonzero(parts == "train")[0]
    w_real = 1.0 / np.bincount(y[real_tr], minlength=k)[y[real_tr]]
    w_real /= w_real.sum()
    real_va = np.nonzero(parts == "val")[0]

    # the weights cannot tell; finalize reads it
    arch = {"layer4_dilation": str(layer4_dilation), "abnormal_top": str(abnormal_top),
            "input_region": spec.input_region or "", "region_margin": str(spec.region_margin),
            **({"region_dropout": str(region_dropout)} if region_dropout else {})}

    def save(tag=None):
        sd = {kk: v.detach().cpu().contiguous() for kk, v in net.state_dict().items()}
        save_file(sd, str(wd / "last.tmp"), metadata=arch)
        os.replace(wd / "last.tmp", wd / "last.safetensors")
        torch.save({"opt": opt.state_dict()}, wd / "opt.tmp")
        os.replace(wd / "opt.tmp", wd / "opt.pt")
        (wd / "state.json").write_text(json.dumps(state, indent=1))
        if tag:
            save_file(sd, str(wd / f"{tag}.safetensors"), metadata=arch)

    def check(size, phase):
        rec = {"step": state["step"], "phase": phase, "size": size,
               **synthetic_check(net, sv_img, sv_y, sv_m, spec, size, device)}
        if phase.startswith("finetune") and len(real_va):
            from dicompipe.train.train import predict_logits
            p = softmax(predict_logits(net, seen[real_va], spec, size=size, device=device), np.float64)
            rec["real_val_macro_auroc"] = float(macro_auroc(y[real_va], p))
        log("CHECK " + json.dumps(rec))
        state["history"].append(rec)
        return rec

    for pi in range(state["phase"], len(phases)):
        name, minutes, size = phases[pi]
        budget = minutes * 60.0
        plr = lr * 0.3 if name.startswith("finetune") else lr
        t_phase0 = time.time() - state["phase_seconds"]
        last_eval = time.time()
        recent: deque = deque(maxlen=50)      # tensors: no GPU sync per step
        last_log = 0.0
        frozen = set_trainable(net, name)
        train_mode(net, frozen)
        state["trained_on"] = torch.cuda.get_device_name(device) if net.fc.weight.is_cuda else "cpu"
        while True:
            el = time.time() - t_phase0
            if el >= budget:
                break
            frac = el / budget
            f = min(frac / 0.05, 1.0) if frac < 0.05 else 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95))
            for g in opt.param_groups:
                g["lr"] = plr * max(f, 0.02)
            n_syn = bs - round(bs * real_share) if name.startswith("finetune") else bs
            # each base slice once per class: within a batch the lesion is the only difference
            if feed is None:
                base = np.repeat(rng.choice(train_normals, -(-n_syn // k)), k)[:n_syn]
                s_img, s_y, s_m = synth_batch(images, fields, base, organ, k, rng, drop_spec, drop_p)
            else:
                s_img, s_y, s_m = feed.next(lambda n=n_syn: (
                    np.repeat(rng.choice(train_normals, -(-n // k)), k)[:n], int(rng.integers(2**31))))
            xs, ms = aug(torch.from_numpy(s_img).to(device), spec, size,
                         masks=torch.from_numpy(s_m).to(device))
            ys = torch.from_numpy(s_y).long().to(device)
            if name.startswith("finetune") and n_syn < bs:      # --real-share 0: synthetic only
                b = rng.choice(real_tr, bs - n_syn, p=w_real)
                real = seen[b]
                if region_dropout > 0:
                    drop = rng.random(len(b)) < region_dropout
                    real = np.where(drop[:, None, None], dropped[b], real)
                xs = torch.cat([xs, aug(torch.from_numpy(real).to(device), spec, size)])
                ys = torch.cat([ys, torch.from_numpy(y[b]).long().to(device)])
            with autocast(bf16, device):
                logits, feat = forward_with_features(net, xs.contiguous(memory_format=torch.channels_last))
            logits, feat = logits.float(), feat.float()
            ce = F.cross_entropy(logits, ys, label_smoothing=0.1)
            loc = location_loss(cell_logits(net, feat[:n_syn]), ms, ys[:n_syn])
            loss = ce + cam_weight * loc
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] += 1
            recent.append(ce.detach())
            tfile = wd / "threads"            # lets a long run take more cores later
            if tfile.exists() and int(tfile.read_text() or threads) != torch.get_num_threads():
                torch.set_num_threads(int(tfile.read_text()))
            if state["step"] % 10 == 0 and time.time() - last_log > 5:
                last_log = time.time()
                # batch CE is noisy: the mean of the last 50 steps shows whether it learns
                log(f"{name} step {state['step']} size {size} ce {float(ce.detach()):.3f} "
                    f"(last 50: {float(torch.stack(list(recent)).mean()):.3f}) loc {float(loc.detach()):.3f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {el / 60:.1f}/{minutes:.0f} min")
            if time.time() - last_eval > eval_every_min * 60:
                state["phase_seconds"] = time.time() - t_phase0
                check(size, name)
                train_mode(net, frozen)
                save()
                last_eval = time.time()
        if feed is not None:
            feed.drain()
        state["phase_seconds"] = 0.0
        state["phase"] = pi + 1
        rec = check(size, name)
        save(tag=f"phase{pi}_{name}")
        set_trainable(net, "all")
        net.train()
        log(f"phase {name} done: {json.dumps(rec)}")
    if feed is not None:
        feed.close()
    return state


def lesion_fields(images: np.ndarray, idx, organ: str, lesion_box: float = 0.2) -> list:
    """Where lesions may go in each of ``images[idx]`` (lung fields, or the pancreas prior);
    None for the other images."""
    fields: list = [None] * len(images)
    for i in idx:
        img = images[i].astype(np.float32) / 255.0
        fields[i] = L.lung_fields(img) if organ == "lung" else L.central_soft_tissue(img, box=lesion_box)
    return fields
