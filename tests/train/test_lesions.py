"""Synthetic lesions, the location loss, the prior correction and a resumable lesion run."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage
from synth import chest_hu

from dicompipe.preprocess.render import render
from dicompipe.train import lesions as L
from dicompipe.train.run import fit_prior_bias, spec_v2


def rendered_chest(n: int = 256) -> np.ndarray:
    spec = spec_v2("lung", size=n)
    return np.clip(render(chest_hu(n)[0], spec)[0] * spec.std + spec.mean, 0, 1).astype(np.float32)


def test_lung_fields_find_both_lungs():
    img = rendered_chest()
    f = L.lung_fields(img)
    from scipy import ndimage
    _, n = ndimage.label(f)
    assert n == 2 and 0.1 < f.mean() < 0.4
    assert img[f].mean() < 0.05                        # dark: lung, not tissue


def test_lung_lesion_lies_in_the_lung_and_changes_only_its_surroundings():
    img = rendered_chest()
    f = L.lung_fields(img)
    for kind in ("benign", "malignant"):
        out, mask = L.insert_lung_lesion(img, f, kind, np.random.default_rng(3))
        assert mask.any() and out.shape == img.shape
        assert out[mask].mean() > img[mask].mean() + 0.2          # a dense lesion in dark lung
        from scipy import ndimage
        far = ~ndimage.binary_dilation(mask, iterations=25)
        np.testing.assert_array_equal(out[far], img[far])
        cy, cx = (int(v) for v in np.argwhere(mask).mean(0))
        assert ndimage.binary_dilation(f, iterations=8)[cy, cx]  # centred in a lung field
    same = L.insert_lung_lesion(img, f, "malignant", np.random.default_rng(3))
    np.testing.assert_array_equal(same[0], L.insert_lung_lesion(img, f, "malignant", np.random.default_rng(3))[0])
    assert L.insert_lung_lesion(img, np.zeros_like(f), "benign", np.random.default_rng(0)) is None


def test_lung_lesion_texture_is_the_slices_own():
    """A lesion carries the slice's tissue texture: the speckle of an 8-bit export stays a
    speckle (black dots included), smooth DICOM tissue stays smooth; otherwise "smooth grey"
    would be what marks a tumour, and every DICOM rendering has it."""
    smooth_img = rendered_chest()
    rng = np.random.default_rng(0)
    speckled = np.where(rng.uniform(size=smooth_img.shape) < 0.5, smooth_img, 0).astype(np.float32)
    for img, dots in ((smooth_img, False), (speckled, True)):
        f = L.lung_fields(img)
        tissue, _ = L.soft_tissue(img)
        core = np.zeros_like(f)
        for seed in range(10):
            out, mask = L.insert_lung_lesion(img, f, "malignant", np.random.default_rng(seed))
            core = ndimage.binary_erosion(mask, iterations=3) & f
            if core.sum() > 30:
                break
        black_tissue = float((img[tissue] < 0.02).mean())
        black_lesion = float((out[core] < 0.02).mean())
        if dots:
            assert black_tissue > 0.3 and abs(black_lesion - black_tissue) < 0.2
        else:
            assert black_lesion < 0.05 and out[core].std() < 3 * img[tissue].std() + 0.02


def test_half_the_malignant_lesions_meet_the_lung_border():
    img = rendered_chest()
    f = L.lung_fields(img)
    touching = 0
    for seed in range(20):
        res = L.insert_lung_lesion(img, f, "malignant", np.random.default_rng(seed))
        touching += bool((res[1] & ~f).sum() > 0.1 * res[1].sum())
    assert 5 <= touching <= 18


def test_pancreas_lesion_is_darker_inside_the_prior():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(0.55, 0.05, (128, 128)), 0, 1).astype(np.float32)
    region = L.central_soft_tissue(img)
    assert region.any() and not region[:20].any()             # central box only
    wide = L.central_soft_tissue(img, box=0.45)                # --lesion-box 0.45: nearly all
    assert wide.sum() > 4 * region.sum() and wide[10:20].any()
    out, mask = L.insert_pancreas_lesion(img, region, rng)
    assert out[mask].mean() < img[mask].mean() - 0.05
    far = ~ndimage.binary_dilation(mask, iterations=12)
    assert np.abs(out[far] - img[far]).max() < 0.01           # nothing changes away from it
    assert region[tuple(np.argwhere(mask).mean(0).astype(int))]
    core = ndimage.binary_erosion(mask, iterations=4)
    detail = lambda a: a - ndimage.uniform_filter(a, 3)      # noqa: E731
    # the tissue's own grain survives: darker, not smoother (no flattening, no added noise)
    ratio = detail(out)[core].std() / detail(img)[core].std()
    assert 0.95 < ratio < 1.05


def test_location_loss_prefers_maps_on_the_lesion():
    import torch  # torch and the torch-based training code: imported here, not at collection

    from dicompipe.train.pretrain import location_loss

    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, :16, :16] = 1                                 # lesion top-left, class 2
    y = torch.tensor([2, 0])
    good = torch.full((2, 3, 4, 4), -4.0)
    good[0, 2, 0, 0] = 4.0
    bad = torch.full((2, 3, 4, 4), -4.0)
    bad[0, 2, 3, 3] = 4.0
    assert location_loss(good, masks, y) < 0.1 < location_loss(bad, masks, y)


def test_cell_logits_average_to_the_class_logits():
    import torch

    from dicompipe.model.network import cell_logits, forward_with_features, resnet50
    net = resnet50(3).eval()
    with torch.no_grad():
        logits, a = forward_with_features(net, torch.randn(2, 3, 64, 64))
        cells = cell_logits(net, a)
    torch.testing.assert_close(cells.mean((2, 3)), logits, atol=1e-4, rtol=1e-4)


def test_evidence_pooling_scores_the_strongest_cells():
    """``abnormal_top``: each abnormal logit is the mean of its best cells (normal stays the
    global mean); a bias folded into the head (the prior correction) shifts it as much."""
    import torch

    from dicompipe.model.network import cell_logits, forward_with_features, resnet50
    net = resnet50(3, layer4_dilation=2, abnormal_top=0.25).eval()      # 4 x 4 cells: best 4
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        logits, a = forward_with_features(net, x)
        torch.testing.assert_close(net(x), logits)                      # training's net(x) too
        cells = cell_logits(net, a).flatten(2)
        want = torch.stack([cells[:, 0].mean(-1), *(cells[:, c].topk(4, -1).values.mean(-1)
                                                    for c in (1, 2))], 1)
        torch.testing.assert_close(logits, want)
        assert (logits[:, 1:] > cells[:, 1:].mean(-1)).all()
        x = torch.ones(1, 3, 64, 64)
        before = forward_with_features(net, x)[0]
        net.fc.bias += torch.tensor([0.0, 1.0, -2.0])
        torch.testing.assert_close(forward_with_features(net, x)[0] - before,
                                   torch.tensor([[0.0, 1.0, -2.0]]))


def test_prior_bias_lifts_balanced_accuracy_and_keeps_sensitivity():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [200, 40, 200])
    logits = rng.normal(0, 1, (len(y), 3))
    logits[np.arange(len(y)), y] += 1.5
    logits[:, 2] += 1.5                                      # the model over-calls class 2
    b = fit_prior_bias(logits, y, positive=2, min_sensitivity=0.9)

    def bacc(z):
        p = z.argmax(1)
        return np.mean([(p[y == c] == c).mean() for c in range(3)])
    assert b[0] == 0 and bacc(logits + b) > bacc(logits) + 0.1
    assert ((logits + b).argmax(1)[y == 2] == 2).mean() >= 0.9


@pytest.mark.slow
def test_lesion_training_runs_checkpoints_and_resumes(tmp_path):
    from dicompipe.train.pretrain import synth_batch, train_lesions

    img = (rendered_chest(64) * 255).astype(np.uint8)
    images = np.stack([img] * 6)
    y = np.array([0, 0, 0, 0, 2, 1])
    parts = ["train", "train", "val", "val", "train", "train"]
    logs = []
    phases = [("pretrain", 0.02, 32), ("finetune", 0.02, 32)]
    state = train_lesions(images, y, parts, np.arange(4), ["normal", "benign", "malignant"],
                          spec_v2("lung", 32), tmp_path, organ="lung", phases=phases,
                          bs=4, threads=1, log=logs.append)
    assert state["phase"] == 2 and state["step"] > 0
    assert (tmp_path / "phase0_pretrain.safetensors").exists()
    assert (tmp_path / "phase1_finetune.safetensors").exists()
    assert {"synthetic_auroc_lesion_vs_none", "cam_peak_in_lesion"} <= set(state["history"][-1])
    steps = json.loads((tmp_path / "state.json").read_text())["step"]
    again = train_lesions(images, y, parts, np.arange(4), ["normal", "benign", "malignant"],
                          spec_v2("lung", 32), tmp_path, organ="lung", phases=phases,
                          bs=4, threads=1, log=logs.append)
    assert again["step"] == steps and any("resumed" in m for m in logs)   # nothing left to do
    imgs, ys, ms = synth_batch(images, [L.lung_fields(i / 255.0) for i in images], np.arange(3),
                               "lung", 3, np.random.default_rng(0))
    assert list(ys) == [0, 1, 2] and not ms[0].any() and ms[1].any() and ms[2].any()


def test_synthetic_slices_are_seen_through_the_input_region_as_inference_sees_them():
    from dicompipe.preprocess.render import keep_region, region_mask
    from dicompipe.train.pretrain import synth_batch
    spec = spec_v2("lung", 160, input_region="lung_fields")
    images = (rendered_chest(256)[None] * 255).astype(np.uint8).repeat(3, 0)
    imgs, ys, ms = synth_batch(images, [L.lung_fields(i / 255.0) for i in images], np.arange(3),
                               "lung", 3, np.random.default_rng(0), spec)
    assert list(ys) == [0, 1, 2] and ms[2].any()
    for img, m in zip(imgs, ms):
        np.testing.assert_array_equal(img, keep_region(img, spec))   # masking again changes nothing
        assert not (m & ~region_mask(img, spec)).any()      # the lesion lies inside what is seen
    assert (imgs[0] == 0).mean() > (images[0] == 0).mean() + 0.1   # the outside of the lungs is gone


def test_region_dropout_shows_a_share_of_the_slices_through_the_lung_fields(tmp_path):
    """--region-dropout: some training slices lose their context, the bundle keeps the body."""
    from safetensors import safe_open

    from dicompipe.preprocess.render import keep_region
    from dicompipe.train.pretrain import synth_batch, train_lesions
    region = spec_v2("lung", 160, input_region="lung_fields")
    images = (rendered_chest(256)[None] * 255).astype(np.uint8).repeat(8, 0)
    fields = [L.lung_fields(i / 255.0) for i in images]

    def masked(imgs):
        return [bool(np.array_equal(im, keep_region(im, region))) for im in imgs]
    for p, expect in ((0.0, {False}), (1.0, {True}), (0.5, {False, True})):
        imgs, _, _ = synth_batch(images, fields, np.arange(8), "lung", 3, np.random.default_rng(1),
                                 region, region_p=p)
        assert set(masked(imgs)) == expect
    y, parts = np.array([0, 0, 0, 0, 2, 1, 2, 1]), ["train", "train", "val", "val"] + ["train"] * 4
    args = (images, y, parts, np.arange(4), ["normal", "benign", "malignant"])
    train_lesions(*args, spec_v2("lung", 32), tmp_path, organ="lung", phases=[("finetune-l4", 0.01, 32)],
                  bs=4, threads=1, region_dropout=0.5, log=lambda m: None)
    with safe_open(str(tmp_path / "phase0_finetune-l4.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["region_dropout"] == "0.5" and md["input_region"] == ""      # inference: whole body
    with pytest.raises(ValueError, match="keeps the whole body"):
        train_lesions(*args, region, tmp_path / "x", organ="lung", phases=[("finetune-l4", 0.01, 32)],
                      bs=4, threads=1, region_dropout=0.5, log=lambda m: None)


def test_finetune_l4_changes_only_layer4_and_the_head(tmp_path):
    import torch
    from safetensors.torch import load_file

    from dicompipe.train.pretrain import train_lesions
    img = (rendered_chest(64) * 255).astype(np.uint8)
    images, y = np.stack([img] * 6), np.array([0, 0, 0, 0, 2, 1])
    parts = ["train", "train", "val", "val", "train", "train"]
    args = (images, y, parts, np.arange(4), ["normal", "benign", "malignant"], spec_v2("lung", 32))
    train_lesions(*args, tmp_path, organ="lung", phases=[("pretrain", 0.01, 32)], bs=4, threads=1,
                  log=lambda m: None)
    before = load_file(str(tmp_path / "phase0_pretrain.safetensors"))
    train_lesions(*args, tmp_path, organ="lung", phases=[("pretrain", 0.01, 32), ("finetune-l4", 0.01, 32)],
                  bs=4, threads=1, log=lambda m: None)
    after = load_file(str(tmp_path / "phase1_finetune-l4.safetensors"))
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {"layer4", "fc"}          # BatchNorm statistics included


def test_real_share_zero_fine_tunes_on_synthetic_lesions_only(tmp_path):
    from dicompipe.train.pretrain import train_lesions
    img = (rendered_chest(64) * 255).astype(np.uint8)
    images, y = np.stack([img] * 6), np.array([0, 0, 0, 0, 2, 1])
    parts = ["train", "train", "val", "val", "train", "train"]
    state = train_lesions(images, y, parts, np.arange(4), ["normal", "benign", "malignant"],
                          spec_v2("lung", 32), tmp_path, organ="lung",
                          phases=[("finetune-l4", 0.01, 32)], bs=4, threads=1, real_share=0.0,
                          log=lambda m: None)
    assert state["step"] > 0 and (tmp_path / "phase0_finetune-l4.safetensors").exists()


def test_init_keeps_the_head_when_its_classes_match(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dicompipe.model.network import resnet50
    from dicompipe.train.pretrain import train_lesions
    img = (rendered_chest(64) * 255).astype(np.uint8)
    images, y = np.stack([img] * 6), np.array([0, 0, 0, 0, 2, 1])
    parts = ["train", "train", "val", "val", "train", "train"]
    args = (images, y, parts, np.arange(4), ["normal", "benign", "malignant"], spec_v2("lung", 32))
    three, two = tmp_path / "three.safetensors", tmp_path / "two.safetensors"
    save_file(resnet50(3).state_dict(), str(three))
    save_file(resnet50(2).state_dict(), str(two))         # e.g. the pancreas network
    logs: list[str] = []
    # a zero-length phase: the weights as initialised are what is saved
    train_lesions(*args, tmp_path / "a", organ="lung", phases=[("finetune-head", 0.0, 32)],
                  bs=4, threads=1, init=three, real_share=0.75, layer4_dilation=2,
                  abnormal_top=0.05, log=logs.append)
    assert "network initialised from three.safetensors" in logs
    out = tmp_path / "a" / "phase0_finetune-head.safetensors"
    with safe_open(str(out), "pt") as f:                 # what finalize_bundle reads
        assert f.metadata() == {"layer4_dilation": "2", "abnormal_top": "0.05", "input_region": "",
                                "region_margin": "0.05"}
    kept = load_file(str(out))
    assert all(np.array_equal(v.numpy(), kept[k].numpy()) for k, v in load_file(str(three)).items())
    train_lesions(*args, tmp_path / "b", organ="lung", phases=[("finetune-head", 0.0, 32)],
                  bs=4, threads=1, init=two, log=logs.append)
    assert "backbone initialised from two.safetensors" in logs


def test_dicom_normals_render_as_inference_does(tmp_path):
    """Extra lesion-free DICOM slices for lesion training: the slices the lung selection
    keeps, each equal to what inference feeds the network (to uint8)."""
    from synth import write_ct_series

    from dicompipe import io, preprocess
    from dicompipe.train import data as D
    from dicompipe.train.run import CACHE_SIZE, dicom_normals

    hu = np.stack([chest_hu(64)[0]] * 4).astype(np.float32)
    write_ct_series(tmp_path / "s", shape=hu.shape, spacing=(5.0, 5.0, 5.0), hu=hu)
    out = dicom_normals([tmp_path / "s"], "lung", size=64)
    spec = dataclasses.replace(spec_v2("lung"), size=64)
    batch = preprocess.prepare(io.load(io.select(io.discover(tmp_path / "s"))), spec, organ="lung")
    assert out.dtype == np.uint8 and out.shape == (len(batch.tensors), 64, 64) and len(out) == 4
    assert np.array_equal(out[0], D.to_cache(batch.tensors[0], spec))
    assert CACHE_SIZE == 256


def test_bf16_training_updates_float32_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    from dicompipe.model.network import resnet50
    from dicompipe.train.pretrain import train_lesions
    img = (rendered_chest(64) * 255).astype(np.uint8)
    images, y = np.stack([img] * 6), np.array([0, 0, 0, 0, 2, 1])
    parts = ["train", "train", "val", "val", "train", "train"]
    logs = []
    state = train_lesions(images, y, parts, np.arange(4), ["normal", "benign", "malignant"],
                          spec_v2("lung", 32), tmp_path, organ="lung", phases=[("pretrain", 0.01, 32)],
                          bs=4, threads=1, bf16=True, log=logs.append)
    w = load_file(str(tmp_path / "phase0_pretrain.safetensors"))
    torch.manual_seed(0)                                   # the trainer's initial network
    start = resnet50(3, zero_init_residual=True).state_dict()
    assert state["step"] > 0 and w["conv1.weight"].dtype == torch.float32
    assert not torch.equal(w["conv1.weight"], start["conv1.weight"])
    assert all(bool(v.isfinite().all()) for v in w.values())
    assert np.isfinite(state["history"][-1]["synthetic_auroc_lesion_vs_none"])


def test_bf16_is_refused_where_it_would_be_emulated(monkeypatch):
    from dicompipe.errors import DicompipeError
    from dicompipe.train import train as T
    monkeypatch.setattr(T, "native_bf16", lambda: False)
    with pytest.raises(DicompipeError, match="no native bfloat16"):
        T.check_bf16()


def test_synthesis_workers_give_the_same_batches_and_feed_training(tmp_path):
    """--workers: lesion batches made in other processes are synth_batch's (as uint8) for
    the same seed, and a run trained from them checkpoints as usual."""
    from dicompipe.train import pretrain as P

    img = (rendered_chest(64) * 255).astype(np.uint8)
    images, y = np.stack([img] * 6), np.array([0, 0, 0, 0, 2, 1])
    fields = P.lesion_fields(images, np.arange(4), "lung")
    P._WORKER.update(images=images, fields=fields, organ="lung", k=3)
    u8, ys, ms = P._synth_u8((np.array([0, 0, 0, 1, 1, 1]), 7))
    ref, ref_y, ref_m = P.synth_batch(images, fields, np.array([0, 0, 0, 1, 1, 1]), "lung", 3,
                                      np.random.default_rng(7))
    assert u8.dtype == np.uint8 and np.array_equal(u8, np.rint(ref * 255).astype(np.uint8))
    assert np.array_equal(ys, ref_y) and np.array_equal(ms, ref_m)
    parts = ["train", "train", "val", "val", "train", "train"]
    state = P.train_lesions(images, y, parts, np.arange(4), ["normal", "benign", "malignant"],
                            spec_v2("lung", 32), tmp_path, organ="lung", workers=2,
                            phases=[("pretrain", 0.02, 32), ("finetune-l4", 0.02, 32)],
                            bs=6, threads=1, log=lambda m: None)
    assert state["phase"] == 2 and state["step"] > 0 and state["trained_on"] == "cpu"
    # only the weights came back (e.g. from a GPU machine): resuming finds nothing to do
    (tmp_path / "opt.pt").unlink()
    logs: list[str] = []
    again = P.train_lesions(images, y, parts, np.arange(4), ["normal", "benign", "malignant"],
                            spec_v2("lung", 32), tmp_path, organ="lung",
                            phases=[("pretrain", 0.02, 32), ("finetune-l4", 0.02, 32)],
                            bs=6, threads=1, log=logs.append)
    assert again["step"] == state["step"] and any("resumed" in m for m in logs)


def test_prepared_data_round_trips_and_names_a_mismatch(tmp_path, monkeypatch):
    """--prepared: the rendered data and lesion fields written once, read back without the
    raw data; a file made for another organ, split or set of extra normals is refused."""
    from dicompipe.errors import DicompipeError
    from dicompipe.train import run as R

    img = (rendered_chest(64) * 255).astype(np.uint8)
    images, y = np.stack([img, img[::-1], img, img]), np.array([0, 0, 2, 0])
    parts = ["train", "val", "train", None]
    labels = ["normal", "benign", "malignant"]
    monkeypatch.setattr(R, "prepare_data", lambda *a, **k: (images, y, parts, np.array([0, 1]),
                                                            labels))
    npz, split = tmp_path / "lung.npz", tmp_path / "split.json"
    split.write_text('{"parts": {}}')
    first = R.prepared_data(npz, "data", "lung", split, tmp_path, log=lambda m: None,
                            extra_normals=["/data/ct/abdomen/series"])
    monkeypatch.setattr(R, "prepare_data", lambda *a, **k: pytest.fail("raw data read again"))
    # elsewhere (a GPU machine): the same series under another root, the split file absent
    back = R.prepared_data(npz, None, "lung", None, tmp_path, log=lambda m: None,
                           extra_normals=["abdomen/series"])
    assert np.array_equal(back["images"], images) and np.array_equal(back["y"], y)
    assert back["parts"] == ["train", "val", "train", ""] and back["labels"] == labels
    assert list(back["normal_idx"]) == [0, 1]
    assert all(np.array_equal(back["fields"][i], first["fields"][i]) for i in (0, 1))
    assert back["fields"][0].any() and back["fields"][2] is None
    with pytest.raises(DicompipeError, match="prepared from other settings: organ 'lung'"):
        R.prepared_data(npz, None, "pancreas", None, tmp_path, log=lambda m: None,
                        extra_normals=["abdomen/series"])
    split.write_text('{"parts": {"a.jpg": "test"}}')
    with pytest.raises(DicompipeError, match="split_sha256"):
        R.prepared_data(npz, None, "lung", split, tmp_path, log=lambda m: None,
                        extra_normals=["abdomen/series"])
    with pytest.raises(DicompipeError, match="extra_normals"):
        R.prepared_data(npz, None, "lung", None, tmp_path, log=lambda m: None)


def test_bf16_check_is_skipped_when_only_the_bundle_is_left_to_write(tmp_path, monkeypatch):
    """A GPU run trained with --bf16; writing its bundle on a CPU without bf16 trains
    nothing, so it is not refused; an unfinished run still is."""
    from dicompipe.errors import DicompipeError
    from dicompipe.train import pretrain as P
    from dicompipe.train import run as R
    from dicompipe.train import train as T
    monkeypatch.setattr(T, "native_bf16", lambda: False)
    monkeypatch.setattr(R, "prepare_data", lambda *a, **k: (None,) * 5)
    monkeypatch.setattr(P, "train_lesions", lambda *a, **k: {"trained": True})
    phases = [("pretrain", 1.0, 32)]
    with pytest.raises(DicompipeError, match="no native bfloat16"):
        R.run_lesion_training("data", "lung", None, tmp_path, phases, bf16=True)
    (tmp_path / "state.json").write_text(json.dumps({"phase": 1}))
    assert R.run_lesion_training("data", "lung", None, tmp_path, phases, bf16=True) == {"trained": True}


def test_a_device_torch_cannot_use_is_refused_before_any_work(monkeypatch):
    import torch

    from dicompipe.errors import DicompipeError
    from dicompipe.train import run as R
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(R, "prepare_data", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(DicompipeError, match="sees no CUDA GPU"):
        R.run_lesion_training("data", "lung", None, "w", [("pretrain", 1.0, 32)], device="cuda")
    with pytest.raises(DicompipeError, match="not a device name"):
        R.check_device("gpu0")
    R.check_device("cpu")


def test_finalize_writes_the_input_region_the_weights_were_trained_with_into_the_bundle(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from dicompipe.model import load_bundle
    from dicompipe.model.network import resnet50
    from dicompipe.train.run import finalize_bundle
    img = (rendered_chest(128) * 255).astype(np.uint8)
    parts = {}
    for folder in ("Normal cases", "Bengin cases", "Malignant cases"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i, part in enumerate(["train", "val", "val", "test", "test"]):
            Image.fromarray(np.roll(img, 3 * i, axis=1)).save(tmp_path / "data" / folder / f"{i}.png")
            parts[f"{folder}/{i}.png"] = part
    (tmp_path / "split.json").write_text(json.dumps({"parts": parts}))
    weights = tmp_path / "w.safetensors"
    save_file(resnet50(3, layer4_dilation=2).state_dict(), str(weights),
              metadata={"layer4_dilation": "2", "abnormal_top": "0.0", "input_region": "lung_fields",
                        "region_margin": "0.05"})
    folder, _ = finalize_bundle(weights, "lung", tmp_path / "data", tmp_path / "split.json",
                                tmp_path / "bundle", size=32, version="9.9.9", training={},
                                workdir=tmp_path / "work", n_boot=10, log=lambda m: None)
    bundle = load_bundle(str(folder), organ="lung")
    assert bundle.spec.input_region == "lung_fields" and bundle.spec.region_margin == 0.05
    assert (tmp_path / "work" / "cache_v2_lung_32_lung_fields.npz").exists()
