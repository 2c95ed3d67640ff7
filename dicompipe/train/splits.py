"""Train/validation/test splits that do not leak patients, plus duplicate handling.

- :func:`block_split`: IQ-OTH/NCCD style (no patient IDs; consecutive file numbers are
  neighbouring slices of one patient): per class, contiguous blocks of file numbers, with
  each cut moved (within ``search``) to the least similar pair of neighbouring files, i.e.
  to the most likely patient boundary.
- :func:`group_split`: whole groups (patient IDs, or content groups = connected components
  of near-duplicate images) go to one part, stratified by label.
- :func:`dedup`: exact and near duplicates (perceptual hash) collapse to one image; images
  that sit under two labels are dropped.
- :func:`naive_split`: random per slice (leaks; only for the comparison).

Splits are lists of part names ("train"/"val"/"test", or None = dropped) per item.

Example::

    >>> h = phash(images)                       # uint64 per image
    >>> groups = near_duplicate_groups(h, 10)   # content groups
    >>> parts = group_split(groups, labels, (0.65, 0.15, 0.2), seed=0)
"""
from __future__ import annotations

import numpy as np

PARTS = ("train", "val", "test")


# --------------------------------------------------------------------------- hashing
def phash(images: np.ndarray, hash_size: int = 8, highfreq: int = 4) -> np.ndarray:
    """Perceptual (DCT) hash of uint8/float images (n, h, w) -> uint64 (n,)."""
    import torch
    import torch.nn.functional as F
    from scipy.fft import dctn

    s = hash_size * highfreq
    t = torch.from_numpy(np.asarray(images, np.float32))[:, None]
    small = F.interpolate(t, size=(s, s), mode="area")[:, 0].numpy()
    d = dctn(small, axes=(1, 2), norm="ortho")[:, :hash_size, :hash_size].reshape(len(images), -1)
    bits = d > np.median(d[:, 1:], axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def hamming(h: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances of uint64 hashes -> (n, n) int."""
    x = h[:, None] ^ h[None, :]
    b = x.view(np.uint8).reshape(len(h), len(h), 8)
    return np.unpackbits(b, axis=2).sum(2)


def components(adj: np.ndarray) -> np.ndarray:
    """Connected-component id per node of a boolean adjacency matrix."""
    n = len(adj)
    comp = -np.ones(n, int)
    c = 0
    for i in range(n):
        if comp[i] >= 0:
            continue
        stack = [i]
        comp[i] = c
        while stack:
            j = stack.pop()
            for k in np.nonzero(adj[j] & (comp < 0))[0]:
                comp[k] = c
                stack.append(k)
        c += 1
    return comp


def near_duplicate_groups(h: np.ndarray, max_dist: int) -> np.ndarray:
    """Content groups: connected components of images within ``max_dist`` hash bits."""
    return components(hamming(h) <= max_dist)


def dedup(images: np.ndarray, labels: np.ndarray, h: np.ndarray, near: int = 4):
    """Keep one image per near-duplicate cluster (``near`` bits, or identical pixels).

    Returns (keep: bool mask, report dict). A cluster with more than one label is dropped
    whole (the image sits under both labels).
    """
    n = len(images)
    exact = {}
    eq = np.zeros((n, n), bool)
    for i in range(n):
        exact.setdefault(images[i].tobytes(), []).append(i)
    for idx in exact.values():
        eq[np.ix_(idx, idx)] = True
    comp = components(eq | (hamming(h) <= near))
    keep = np.zeros(n, bool)
    conflicting = dropped_dup = 0
    for c in np.unique(comp):
        idx = np.nonzero(comp == c)[0]
        if len(set(labels[idx].tolist())) > 1:
            conflicting += len(idx)
            continue
        keep[idx[0]] = True
        dropped_dup += len(idx) - 1
    return keep, {"images": int(n), "kept": int(keep.sum()),
                  "duplicates_removed": int(dropped_dup),
                  "conflicting_label_images_removed": int(conflicting),
                  "near_duplicate_bits": near}


# --------------------------------------------------------------------------- splits
def _targets(n: int, fractions) -> list[int]:
    f = np.asarray(fractions, float) / np.sum(fractions)
    cuts = np.rint(np.cumsum(f) * n).astype(int)
    return cuts[:-1].tolist()


def block_split(numbers, labels, fractions=(0.65, 0.15, 0.20), similarity=None,
                search: int = 10, order=PARTS) -> list[str]:
    """Per class, sort by file number and cut into contiguous blocks (train | val | test).

    ``similarity[i]`` (optional, per item): similarity of item i to the next-numbered
    item of its class; a cut is moved within +-``search`` positions to the least similar
    pair, i.e. between patients.
    """
    numbers, labels = np.asarray(numbers), np.asarray(labels)
    parts = [None] * len(numbers)
    for lab in np.unique(labels):
        idx = np.nonzero(labels == lab)[0]
        idx = idx[np.argsort(numbers[idx], kind="stable")]
        cuts, prev = [], 0
        for c in _targets(len(idx), fractions):
            if similarity is not None:
                lo, hi = max(prev + 1, c - search), min(len(idx) - 1, c + search)
                if hi > lo:
                    sims = [similarity[idx[j - 1]] for j in range(lo, hi + 1)]   # pair (j-1, j)
                    c = lo + int(np.argmin(sims))
            c = max(c, prev)              # blocks stay in order (an empty part is allowed)
            cuts.append(c)
            prev = c
        bounds = [0] + cuts + [len(idx)]
        for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            for j in idx[a:b]:
                parts[j] = order[p]
    return parts


def neighbour_similarity(images: np.ndarray, numbers, labels, size: int = 32) -> np.ndarray:
    """Correlation of each image with the next-numbered image of the same class (last: 0)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(images, np.float32))[:, None]
    v = F.interpolate(t, size=(size, size), mode="area")[:, 0].reshape(len(images), -1).numpy()
    v = v - v.mean(1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-6
    numbers, labels = np.asarray(numbers), np.asarray(labels)
    sim = np.zeros(len(images))
    for lab in np.unique(labels):
        idx = np.nonzero(labels == lab)[0]
        idx = idx[np.argsort(numbers[idx], kind="stable")]
        for a, b in zip(idx[:-1], idx[1:]):
            sim[a] = float(v[a] @ v[b])
    return sim


def group_split(groups, labels, fractions=(0.65, 0.15, 0.20), seed: int = 0,
                order=PARTS) -> list[str]:
    """Whole groups to one part each, greedily stratified by each group's majority label."""
    groups, labels = np.asarray(groups), np.asarray(labels)
    rng = np.random.default_rng(seed)
    f = np.asarray(fractions, float) / np.sum(fractions)
    ug = np.unique(groups)
    rng.shuffle(ug)
    # large groups first so that the small ones can even out the fractions
    ug = sorted(ug, key=lambda g: -int((groups == g).sum()))
    nlab = int(labels.max()) + 1 if len(labels) else 0
    total = np.bincount(labels, minlength=nlab).astype(float)
    fill = np.zeros((len(f), nlab))
    parts = [None] * len(groups)
    for g in ug:
        idx = np.nonzero(groups == g)[0]
        lab = int(np.bincount(labels[idx], minlength=nlab).argmax())
        deficit = f * total[lab] - fill[:, lab]
        p = int(np.argmax(deficit))
        fill[p] += np.bincount(labels[idx], minlength=nlab)
        for j in idx:
            parts[j] = order[p]
    return parts


def naive_split(labels, fractions=(0.65, 0.15, 0.20), seed: int = 0, order=PARTS) -> list[str]:
    """Random per-slice split, stratified by label. Leaks patients: comparison only."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = [None] * len(labels)
    for lab in np.unique(labels):
        idx = np.nonzero(labels == lab)[0]
        rng.shuffle(idx)
        bounds = [0] + _targets(len(idx), fractions) + [len(idx)]
        for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            for j in idx[a:b]:
                parts[j] = order[p]
    return parts


def isolate(parts: list, groups) -> list:
    """Make every group sit in one part: a group found in several parts moves whole to the
    earliest of them (train before val before test), so test keeps no near-copy of train."""
    groups = np.asarray(groups)
    parts = list(parts)
    rank = {p: i for i, p in enumerate(PARTS)}
    for g in np.unique(groups):
        idx = [i for i in np.nonzero(groups == g)[0] if parts[i] is not None]
        ps = {parts[i] for i in idx}
        if len(ps) > 1:
            first = min(ps, key=rank.get)
            for i in idx:
                parts[i] = first
    return parts


def summary(parts, labels, names) -> dict:
    """Counts per part and label."""
    labels = np.asarray(labels)
    out = {}
    for p in PARTS:
        m = np.array([q == p for q in parts])
        out[p] = {n: int(((labels == k) & m).sum()) for k, n in enumerate(names)}
    return out
