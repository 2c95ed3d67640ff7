"""Bundles: save/load round trip, sha256 and shape checks, organ and untrained refusals,
torchvision state dicts by name."""
import json

import numpy as np
import pytest
from tiny_bundle import make_bundle, make_net

from dicompipe.errors import ModelError
from dicompipe.model import Bundle, load_bundle, resnet50_from_torchvision, save_bundle
from dicompipe.model.bundle import METADATA_FILE, WEIGHTS_FILE, read_weights
from dicompipe.types import PreprocessSpec


@pytest.fixture(scope="module")
def lung_path(tmp_path_factory):
    spec = PreprocessSpec(windows=[(-600.0, 1500.0)], slab_mm=5.0, spacing=1.0)
    return make_bundle(tmp_path_factory.mktemp("b") / "lung", organ="lung", spec=spec,
                       favour="benign", seed=3)


def test_round_trip_metadata_and_weights(lung_path):
    import torch  # in the tests that use it: importing torch at collection is slow

    b = load_bundle(lung_path, organ="lung", allow_untrained=True)
    assert isinstance(b, Bundle)
    md = json.loads((lung_path / METADATA_FILE).read_text())
    assert md["schema"] == "dicompipe-bundle/1"
    assert md["weights"] == {"file": WEIGHTS_FILE, "sha256": b.sha256, "dtype": "float16"}
    assert md["network"] == {"arch": "resnet50", "in_channels": 3, "conv1_t_stride": 2}
    assert b.labels == ["normal", "benign", "malignant"] and b.organ == "lung"
    assert b.spec == PreprocessSpec(windows=[(-600.0, 1500.0)], slab_mm=5.0, spacing=1.0)
    assert b.trained is False and b.temperature == 1.0
    assert b.aggregation["rule"] == "topk_mean"
    assert (lung_path / "docs" / "README.md").read_text().startswith("# test-lung-resnet50")
    # fp16 on disk, fp32 in memory, equal to the source net within fp16 rounding
    on_disk = read_weights(lung_path / WEIGHTS_FILE)
    assert on_disk["conv1.weight"].dtype == torch.float16
    net = b.network()
    assert net is b.network() and not net.training
    src = make_net(3, 3, seed=3, favour=1).state_dict()
    got = net.state_dict()
    assert got["layer4.2.conv3.weight"].dtype == torch.float32
    for k in ("conv1.weight", "layer3.1.bn2.running_var", "fc.weight", "fc.bias"):
        torch.testing.assert_close(got[k], src[k].half().float())
    card = b.card()
    assert card["sha256"] == b.sha256 and card["trained"] is False
    assert card["labels"] == b.labels and "intended_use" in card
    assert card["training_data"] == "none: seeded random weights for tests"


def test_untrained_refused_with_clear_message(lung_path):
    with pytest.raises(ModelError, match="untrained"):
        load_bundle(lung_path)


def test_organ_mismatch(lung_path):
    with pytest.raises(ModelError, match="is for lung CT, not pancreas"):
        load_bundle(lung_path, organ="pancreas", allow_untrained=True)


def test_unknown_bundle_name_lists_builtins(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_bundle("no-such-bundle")
    with pytest.raises(ModelError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_sha256_mismatch_names_the_file(tmp_path):
    p = make_bundle(tmp_path / "b", organ="pancreas")
    w = p / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.safetensors do not match the sha256"):
        load_bundle(p, allow_untrained=True)


def test_an_unknown_input_region_is_refused_when_the_bundle_loads(tmp_path):
    p = make_bundle(tmp_path / "b", organ="lung")
    mdf = p / METADATA_FILE
    md = json.loads(mdf.read_text())
    md["preprocessing"]["input_region"] = "liver"
    mdf.write_text(json.dumps(md))
    with pytest.raises(ModelError, match="input_region 'liver' is not one this dicompipe renders"):
        load_bundle(p, allow_untrained=True)


def test_shape_mismatch_names_the_file(tmp_path):
    p = make_bundle(tmp_path / "b", organ="lung")
    md = json.loads((p / METADATA_FILE).read_text())
    md["labels"] = ["normal", "tumour"]          # weights have 3 outputs
    (p / METADATA_FILE).write_text(json.dumps(md))
    b = load_bundle(p, allow_untrained=True)
    with pytest.raises(ModelError, match=r"model\.safetensors do not fit.*fc\.weight"):
        b.network()


def test_save_refuses_inconsistent_metadata(tmp_path):
    net = make_net(2)
    with pytest.raises(ModelError, match="2 outputs but metadata lists 3"):
        save_bundle(tmp_path / "x", net, {"name": "x", "organ": "lung",
                                          "labels": ["a", "b", "c"]})
    with pytest.raises(ModelError, match="needs 'organ'"):
        save_bundle(tmp_path / "x", net, {"name": "x", "labels": ["a", "b"]})


def test_pt_weights_are_read_without_pickled_objects(tmp_path):
    import torch

    sd = make_net(2).state_dict()
    torch.save(sd, tmp_path / "w.pt")
    got = read_weights(tmp_path / "w.pt")
    torch.testing.assert_close(got["fc.weight"], sd["fc.weight"])
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "obj.pt")   # a pickled module
    with pytest.raises(ModelError, match="Cannot read weights"):
        read_weights(tmp_path / "obj.pt")


def test_torchvision_state_dict_loads_by_name():
    import torch

    from dicompipe.model import resnet50

    # a torchvision-named resnet50 state dict (same names, ImageNet head of 1000 classes)
    torch.manual_seed(1)
    tv = {k: torch.randn_like(v.float()) if v.is_floating_point() else v
          for k, v in resnet50(num_classes=1000).state_dict().items()}
    net = resnet50_from_torchvision(tv, num_classes=3)
    got = net.state_dict()
    for k in ("conv1.weight", "layer2.0.downsample.0.weight", "layer4.2.bn3.running_mean"):
        torch.testing.assert_close(got[k], tv[k])
    assert got["fc.weight"].shape == (3, 2048)
    # a 1-channel stem gets the RGB kernels summed (torchvision convention)
    one = resnet50_from_torchvision(tv, num_classes=2, in_channels=1)
    torch.testing.assert_close(one.state_dict()["conv1.weight"],
                               tv["conv1.weight"].sum(1, keepdim=True))
    with pytest.raises(ModelError, match="does not look like a torchvision resnet50"):
        resnet50_from_torchvision({"features.0.weight": torch.zeros(3)}, num_classes=3)


def test_input_bundle_not_modified_by_loading(lung_path):
    before = {p: p.read_bytes() for p in lung_path.rglob("*") if p.is_file()}
    b = load_bundle(lung_path, allow_untrained=True)
    b.network()
    after = {p: p.read_bytes() for p in lung_path.rglob("*") if p.is_file()}
    assert before == after
    assert np.isfinite(b.network().fc.weight.detach().numpy()).all()


def test_head_is_read_without_building_the_network(lung_path):
    b = load_bundle(lung_path, allow_untrained=True)
    w, bias = b.head()
    assert b._net is None                               # nothing built for it
    fc = load_bundle(lung_path, allow_untrained=True).network().fc
    np.testing.assert_array_equal(w, fc.weight.detach().numpy())
    np.testing.assert_array_equal(bias, fc.bias.detach().numpy())
    assert w.shape == (3, 2048) and w.dtype == np.float32


def test_onnx_inference_from_a_cached_export_does_not_import_monai(lung_path):
    pytest.importorskip("onnxruntime")
    import subprocess
    import sys

    from dicompipe.model.onnx_backend import export
    export(load_bundle(lung_path, allow_untrained=True))     # the cache the user run finds
    code = ("import sys, numpy as np\n"
            "from dicompipe.model import load_bundle, get_backend\n"
            f"b = load_bundle({str(lung_path)!r}, allow_untrained=True)\n"
            "logits, _ = get_backend(b, 'onnx', 'cpu')(np.zeros((1, 3, 224, 224), np.float32))\n"
            "b.head()\n"
            "assert logits.shape == (1, 3)\n"
            "print('monai' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_openvino_backend_module_does_not_import_onnxruntime():
    """A warm OpenVINO run loads its compiled blob: ONNX Runtime (~50 ms to import) is only
    needed to make an int8 model, so the module does not import it."""
    pytest.importorskip("openvino")
    import subprocess
    import sys
    code = ("import sys\nimport dicompipe.model.openvino_backend\n"
            "print('onnxruntime' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_card_names_a_builtin_bundle_without_a_machine_path(tmp_path):
    b = load_bundle("lung-resnet50")
    card = b.card()
    assert card["builtin"] and card["path"] is None and card["name"] == "lung-resnet50"
    own = load_bundle(make_bundle(tmp_path / "mine"), allow_untrained=True)
    assert not own.card()["builtin"] and own.card()["path"] == str(own.path)


def test_no_lazy_public_name_is_also_a_submodule():
    """Importing a submodule sets the package attribute of its name: a lazily exported
    function of the same name (``model.predict`` from ``model/predict.py``, before) would
    become the module for everyone once any code imported the submodule directly."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil\n"
            "for pkg in ('dicompipe.model', 'dicompipe.explain'):\n"
            "    mod = importlib.import_module(pkg)\n"
            "    subs = {m.name for m in pkgutil.iter_modules(mod.__path__)}\n"
            "    lazy = []\n"
            "    for name in subs - set(vars(mod)):\n"
            "        try:\n"
            "            mod.__getattr__(name)        # a public name imported on first use\n"
            "            lazy.append(name)\n"
            "        except AttributeError:\n"
            "            pass\n"
            "    print(pkg, lazy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["dicompipe.model", "[]", "dicompipe.explain", "[]"], out.stdout
