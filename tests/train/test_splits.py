"""Leak-free splits, duplicate handling and hashing (model stage, issue 6). No real data."""
import numpy as np

from dicompipe.train import splits as S


def _blobs(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return (rng.random((n, size, size)) * 255).astype(np.uint8)


def test_block_split_contiguous_per_class():
    numbers = list(range(1, 41)) + list(range(1, 21))
    labels = [0] * 40 + [1] * 20
    parts = S.block_split(numbers, labels, (0.6, 0.2, 0.2))
    for lab in (0, 1):
        seq = [p for n_, l, p in sorted(zip(numbers, labels, parts)) if l == lab]
        # train block, then val block, then test block: never interleaved
        changes = [a for a, b in zip(seq, seq[1:]) if a != b]
        assert changes == ["train", "val"]
        assert seq[0] == "train" and seq[-1] == "test"
    assert parts.count("test") == 8 + 4


def test_block_split_moves_cut_to_patient_boundary():
    numbers = list(range(20))
    labels = [0] * 20
    sim = np.ones(20)
    sim[11] = 0.0              # files 11 and 12 belong to different patients
    parts = S.block_split(numbers, labels, (0.5, 0.0, 0.5), similarity=sim, search=3)
    assert parts[:12] == ["train"] * 12 and parts[12:] == ["test"] * 8


def test_group_split_keeps_groups_whole_and_stratifies():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 5)
    labels = np.repeat(rng.integers(0, 2, 30), 5)
    parts = S.group_split(groups, labels, (0.6, 0.2, 0.2), seed=0)
    for g in range(30):
        assert len({parts[i] for i in np.nonzero(groups == g)[0]}) == 1
    counts = S.summary(parts, labels, ["a", "b"])
    for lab in "ab":
        assert counts["test"][lab] > 0 and counts["train"][lab] > counts["test"][lab]


def test_phash_duplicates_and_groups():
    imgs = _blobs(6)
    imgs[3] = imgs[0]                                  # exact duplicate
    imgs[4] = np.clip(imgs[1].astype(int) + 2, 0, 255)  # near duplicate (brightness)
    h = S.phash(imgs)
    d = S.hamming(h)
    assert d[0, 3] == 0 and d[1, 4] <= 4 and d[0, 1] > 10
    g = S.near_duplicate_groups(h, 4)
    assert g[0] == g[3] and g[1] == g[4] and len(set(g)) == 4
    labels = np.array([0, 1, 0, 1, 1, 0])
    labels[3] = 1                                       # the copy of image 0 sits under both labels
    keep, rep = S.dedup(imgs, labels, h, near=4)
    assert not keep[0] and not keep[3]                  # both dropped
    assert keep[1] != keep[4]                           # one of the pair kept
    assert rep["conflicting_label_images_removed"] == 2


def test_isolate_moves_groups_to_earliest_part():
    parts = ["train", "test", "val", "test", None]
    groups = [0, 0, 1, 1, 1]
    assert S.isolate(parts, groups) == ["train", "train", "val", "val", None]


def test_naive_split_is_stratified_random():
    labels = [0] * 50 + [1] * 50
    parts = S.naive_split(labels, (0.6, 0.2, 0.2), seed=3)
    assert parts[:50].count("test") == 10 and parts[50:].count("test") == 10
    assert parts != S.naive_split(labels, (0.6, 0.2, 0.2), seed=4)
