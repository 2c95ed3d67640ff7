"""Model bundles: a folder with weights, preprocessing and a model card (MONAI bundle layout).

::

    BUNDLE/configs/metadata.json     name, version, organ, labels, network, preprocessing,
                                     aggregation, calibration, trained, training, metrics,
                                     intended_use, weights {file, sha256, dtype}
    BUNDLE/models/model.safetensors  state dict of dicompipe.model.network.resnet50 (fp16 on disk)
    BUNDLE/models/ood.safetensors    optional OOD model (arrays; metadata "ood", see model.ood)
    BUNDLE/docs/README.md            model card

Weights are read with safetensors (or ``torch.load(weights_only=True)`` for ``.pt``), never
by unpickling arbitrary objects, and their sha256 is checked against metadata.json.

Example::

    >>> from dicompipe.model import resnet50, save_bundle, load_bundle
    >>> save_bundle("my-lung", resnet50(3), {"name": "my-lung", "organ": "lung",
    ...             "labels": ["normal", "benign", "malignant"], "trained": True})
    >>> b = load_bundle("my-lung", organ="lung")
    >>> b.network()            # ResNet50 in eval mode, fp32
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicompipe.errors import ModelError
from dicompipe.types import INPUT_REGIONS, RESEARCH_USE, PreprocessSpec

if TYPE_CHECKING:           # torch is imported where weights are read: not on the ONNX/OpenVINO path
    import torch

SCHEMA = "dicompipe-bundle/1"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "bundles"
WEIGHTS_FILE = "models/model.safetensors"
METADATA_FILE = "configs/metadata.json"
DEFAULT_AGGREGATION = {"rule": "topk_mean", "k": 5, "uncertain_band": [0.4, 0.6]}
_DTYPES = ("float16", "bfloat16", "float32")


# --------------------------------------------------------------------------- saving
def save_bundle(path, net, metadata: Mapping[str, Any], dtype: str = "float16",
                card: str | None = None) -> Path:
    """Write a bundle folder from a network (or its state dict) and metadata; returns the folder.

    ``metadata`` needs ``name``, ``organ`` and ``labels``; the rest gets defaults
    (``preprocessing`` may be a :class:`PreprocessSpec`). ``weights`` (file, sha256, dtype)
    is always filled here. ``card`` is the model-card markdown (generated when None).

    >>> save_bundle("out/lung-resnet50", net, {"name": "lung-resnet50", "organ": "lung",
    ...             "labels": ["normal", "benign", "malignant"], "trained": True})
    """
    import torch
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ModelError(f"Unsupported weight dtype {dtype!r}: use one of {', '.join(_DTYPES)}.")
    md = _complete_metadata(dict(metadata))
    state = net.state_dict() if isinstance(net, torch.nn.Module) else dict(net)
    n_out = state.get("fc.weight")
    if n_out is None:
        raise ModelError("save_bundle: the state dict has no 'fc.weight' (not a dicompipe ResNet50).")
    if n_out.shape[0] != len(md["labels"]):
        raise ModelError(f"save_bundle: the network has {n_out.shape[0]} outputs but metadata "
                         f"lists {len(md['labels'])} labels {md['labels']}.")
    in_ch = state["conv1.weight"].shape[1]
    md["network"] = {"arch": "resnet50", "in_channels": int(in_ch), "conv1_t_stride": 2,
                     **{k: v for k, v in md.get("network", {}).items()
                        if k not in ("in_channels",)}}
    if md["preprocessing"]["channels"] != in_ch:
        raise ModelError(f"save_bundle: preprocessing declares {md['preprocessing']['channels']} "
                         f"channels but the network takes {in_ch}.")
    tdt = getattr(torch, dtype)
    out = {k: (v.detach().to("cpu", tdt) if v.is_floating_point() else v.detach().cpu()).contiguous()
           for k, v in state.items()}

    root = Path(path)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "docs").mkdir(parents=True, exist_ok=True)
    wfile = root / WEIGHTS_FILE
    tmp = wfile.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={"format": "pt", "schema": SCHEMA})
    tmp.replace(wfile)
    wfile.chmod(0o644)
    md["weights"] = {"file": WEIGHTS_FILE, "sha256": _sha256(wfile), "dtype": dtype}
    (root / METADATA_FILE).write_text(json.dumps(md, indent=2) + "\n")
    (root / "docs" / "README.md").write_text(card if card is not None else _model_card(md))
    return root


def _complete_metadata(md: dict) -> dict:
    for key in ("name", "organ", "labels"):
        if not md.get(key):
            raise ModelError(f"Bundle metadata needs {key!r} (got keys: {sorted(md)}).")
    pre = md.get("preprocessing", PreprocessSpec())
    pre = pre.to_dict() if isinstance(pre, PreprocessSpec) else PreprocessSpec.from_dict(pre).to_dict()
    md["preprocessing"] = pre
    md["labels"] = [str(x) for x in md["labels"]]
    md.setdefault("version", "0.0.0")
    md.setdefault("task", "classification")
    md.setdefault("aggregation", dict(DEFAULT_AGGREGATION))
    md.setdefault("calibration", {"temperature": 1.0, "method": "none"})
    md.setdefault("trained", False)
    md.setdefault("intended_use", "Research use only. " + RESEARCH_USE)
    md.setdefault("training", {})
    md.setdefault("metrics", {})
    md["schema"] = SCHEMA
    order = ["schema", "name", "version", "task", "organ", "labels", "positive_labels", "network",
             "preprocessing", "aggregation", "calibration", "ood", "trained", "training", "metrics",
             "intended_use", "weights"]
    return {**{k: md[k] for k in order if k in md}, **{k: v for k, v in md.items() if k not in order}}


def _model_card(md: dict) -> str:
    lines = [f"# {md['name']} {md['version']}", "", f"**{md['intended_use']}**", "",
             f"- Task: {md['task']} of {md['organ']} CT slices into {', '.join(md['labels'])}",
             "- Network: ResNet50 (MONAI, Bottleneck [3,4,6,3], 2D, stride-2 stem"
             + (f", layer4 dilated x{d}: stride 16" if (d := md["network"].get("layer4_dilation", 1)) != 1
                else "")
             + (f", abnormal logits = mean of the top {t:g} of cells"
                if (t := md["network"].get("abnormal_top", 0)) else "")
             + f"), {md['network']['in_channels']} input channels",
             f"- Trained: {'yes' if md['trained'] else 'NO (random/fixture weights: not for use)'}",
             f"- Preprocessing: `{json.dumps(md['preprocessing'])}`",
             f"- Aggregation: `{json.dumps(md['aggregation'])}`",
             f"- Calibration: `{json.dumps(md['calibration'])}`"]
    if md.get("training"):
        lines += ["", "## Training", "", "```json", json.dumps(md["training"], indent=2), "```"]
    if md.get("metrics"):
        lines += ["", "## Metrics", "", "```json", json.dumps(md["metrics"], indent=2), "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- loading
@dataclass
class Bundle:
    """A loaded bundle: metadata plus a lazily built network.

    >>> b = load_bundle("lung-resnet50")
    >>> b.labels, b.spec.windows, b.temperature
    >>> net = b.network()      # torch module, eval mode, fp32, built on first call
    """

    path: Path
    metadata: dict
    _net: Any = field(default=None, repr=False)
    _backends: dict = field(default_factory=dict, repr=False)   # backends.get_backend cache
    _ood: Any = field(default=None, repr=False)

    name = property(lambda self: self.metadata["name"])
    version = property(lambda self: self.metadata.get("version", "0.0.0"))
    organ = property(lambda self: self.metadata["organ"])
    labels = property(lambda self: list(self.metadata["labels"]))
    trained = property(lambda self: bool(self.metadata.get("trained", False)))
    sha256 = property(lambda self: self.metadata["weights"]["sha256"])
    aggregation = property(lambda self: {**DEFAULT_AGGREGATION, **self.metadata.get("aggregation", {})})

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.metadata.get("preprocessing", {}))

    @property
    def temperature(self) -> float:
        return float((self.metadata.get("calibration") or {}).get("temperature", 1.0) or 1.0)

    @property
    def layer4_dilation(self) -> int:
        """1 for the standard ResNet50, 2 when layer4 is dilated (stride 16, finer CAM)."""
        return int((self.metadata.get("network") or {}).get("layer4_dilation", 1))

    @property
    def abnormal_top(self) -> float:
        """0 for the standard head (global average), else the share of cells whose mean
        is each abnormal class's logit (:func:`dicompipe.model.network.class_logits`)."""
        return float((self.metadata.get("network") or {}).get("abnormal_top", 0.0))

    @property
    def positive_labels(self) -> list[str]:
        return list(self.metadata.get("positive_labels") or [])

    @property
    def weights_path(self) -> Path:
        return self.path / self.metadata["weights"]["file"]

    def network(self) -> torch.nn.Module:
        """The ResNet50 with the bundle's weights, fp32, eval mode (built once, then cached)."""
        if self._net is None:
            from dicompipe.model.network import resnet50  # MONAI: imported only when needed
            net = resnet50(num_classes=len(self.labels),
                           in_channels=int(self.metadata.get("network", {}).get("in_channels", 3)),
                           layer4_dilation=self.layer4_dilation, abnormal_top=self.abnormal_top)
            state = {k: (v.float() if v.is_floating_point() else v)
                     for k, v in read_weights(self.weights_path).items()}
            own = net.state_dict()
            bad = [f"{k}: file {tuple(v.shape)} vs network {tuple(own[k].shape)}"
                   for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
            missing = [k for k in own if k not in state]
            extra = [k for k in state if k not in own]
            if bad or missing or extra:
                raise ModelError(
                    f"Weights {self.weights_path} do not fit a ResNet50 with {len(self.labels)} "
                    f"labels: " + "; ".join(
                        ([f"shape mismatch {', '.join(bad[:3])}"] if bad else [])
                        + ([f"missing {', '.join(missing[:3])}"] if missing else [])
                        + ([f"unexpected {', '.join(extra[:3])}"] if extra else []))
                    + ". Re-export the bundle with dicompipe.model.save_bundle.")
            net.load_state_dict(state)
            self._net = net.eval()
        return self._net

    def ood(self):
        """The bundle's OOD model (:class:`dicompipe.model.ood.OodModel`, read once from
        safetensors and sha256-checked), or None when the metadata has no ``"ood"`` entry.

        >>> b.ood().slice_threshold if b.ood() else "not available"
        """
        entry = self.metadata.get("ood")
        if not entry:
            return None
        if self._ood is None:
            from dicompipe.model.ood import load_ood
            self._ood = load_ood(self.path, entry)
        return self._ood

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The linear head (weight (K, 2048), bias (K,)) as float32 — what closed-form
        Grad-CAM needs. Read from the weights file without building the network (so a
        non-torch backend never imports MONAI), unless the network is already built."""
        if self._net is not None:
            fc = self._net.fc
            return (fc.weight.detach().float().cpu().numpy().copy(),
                    fc.bias.detach().float().cpu().numpy().copy())
        p = self.weights_path
        if p.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                with safe_open(str(p), framework="numpy") as f:     # no torch import
                    w, b = f.get_tensor("fc.weight"), f.get_tensor("fc.bias")
            except Exception as e:  # noqa: BLE001 - safetensors errors are untyped
                raise ModelError(f"Cannot read the head (fc.weight, fc.bias) from {p}: {e}.") from e
        else:
            state = read_weights(p)
            w, b = state["fc.weight"].float().numpy(), state["fc.bias"].float().numpy()
        if tuple(w.shape) != (len(self.labels), 2048) or tuple(b.shape) != (len(self.labels),):
            raise ModelError(f"Weights {p}: head fc.weight {tuple(w.shape)} does not fit "
                             f"{len(self.labels)} labels x 2048 features.")
        return np.array(w, np.float32), np.array(b, np.float32)

    @property
    def builtin(self) -> bool:
        """Whether this is one of the bundles shipped inside the package."""
        try:
            return Path(self.path).resolve().is_relative_to(BUILTIN_DIR)
        except OSError:
            return False

    def card(self) -> dict:
        """The model-card summary that goes into ``Analysis.model`` / analysis.json."""
        md = self.metadata
        tr = md.get("training") or {}
        return {
            "name": self.name, "version": self.version, "organ": self.organ,
            "task": md.get("task", "classification"), "labels": self.labels,
            "positive_labels": self.positive_labels,
            "sha256": self.sha256, "trained": self.trained,
            # a built-in bundle is named by name + version; a machine path would only leak
            # where dicompipe is installed (a user's own bundle keeps the path it was given)
            "builtin": self.builtin, "path": None if self.builtin else str(self.path),
            "architecture": "resnet50 (MONAI, conv1_t_stride=2"
                            + (f", layer4 dilation {self.layer4_dilation}" if self.layer4_dilation != 1 else "")
                            + (f", abnormal top {self.abnormal_top:g}" if self.abnormal_top else "") + ")",
            "preprocessing": md.get("preprocessing"),
            "aggregation": self.aggregation, "temperature": self.temperature,
            "calibration": md.get("calibration") or {},
            "ood": {k: v for k, v in (md.get("ood") or {}).items() if k != "labels"} or None,
            "intended_use": md.get("intended_use", RESEARCH_USE),
            "training_data": tr.get("data") or tr.get("dataset") or tr.get("datasets"),
            "training": {k: v for k, v in tr.items() if not isinstance(v, (list, dict)) or k in
                         ("data", "dataset", "datasets", "split")},
            "metrics": md.get("metrics") or {},
        }


def available_bundles() -> list[str]:
    """Names of the built-in bundles (folders under dicompipe/bundles with metadata.json)."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / METADATA_FILE).is_file())


def load_bundle(name_or_path, *, organ: str | None = None, allow_untrained: bool = False,
                verify: bool = True) -> Bundle:
    """Open a bundle by built-in name or folder path; checks schema, organ, training and sha256.

    Raises :class:`ModelError` when the bundle is missing, covers another organ, is untrained
    (unless ``allow_untrained``) or its weights do not match the recorded sha256.

    >>> b = load_bundle("lung-resnet50", organ="lung")
    >>> b = load_bundle("runs/train/bundle", allow_untrained=True)
    """
    if isinstance(name_or_path, Bundle):
        b = name_or_path
    else:
        b = Bundle(path=_resolve(name_or_path), metadata={})
        b.metadata = _read_metadata(b.path)
    if organ is not None and b.organ != organ:
        raise ModelError(f"Bundle {b.name!r} ({b.path}) is for {b.organ} CT, not {organ}: choose "
                         f"a {organ} bundle with --model, or --organ {b.organ}.")
    if not b.trained and not allow_untrained:
        raise ModelError(
            f"Bundle {b.name!r} ({b.path}) has untrained (random/fixture) weights "
            "(metadata.json says \"trained\": false); its verdicts would be meaningless. "
            "Train one with `dicompipe train` and pass it with --model, or use "
            "allow_untrained=True in code for testing.")
    if verify and not isinstance(name_or_path, Bundle):
        wf = b.weights_path
        if not wf.is_file():
            raise ModelError(f"Bundle {b.name!r}: weights file {wf} is missing.")
        digest = _sha256(wf)
        if digest != b.sha256:
            raise ModelError(f"Weights {wf} do not match the sha256 in {b.path / METADATA_FILE} "
                             f"(file {digest[:12]}…, expected {str(b.sha256)[:12]}…): the file is "
                             "corrupt or was replaced. Restore the bundle or re-export it.")
        if b.metadata.get("ood"):
            b.ood()                     # checks the OOD model's sha256 and shapes now
    return b


def _resolve(name_or_path) -> Path:
    p = Path(name_or_path).expanduser()
    if (p / METADATA_FILE).is_file():
        return p
    if p.name == "metadata.json" and p.is_file():
        return p.parent.parent
    if (isinstance(name_or_path, str) and "/" not in name_or_path
            and (BUILTIN_DIR / name_or_path / METADATA_FILE).is_file()):
        return BUILTIN_DIR / name_or_path
    known = available_bundles()
    if p.exists():
        raise ModelError(f"{p} is not a model bundle: it has no {METADATA_FILE}.")
    raise ModelError(f"Model bundle {str(name_or_path)!r} not found: it is neither a folder nor a "
                     f"built-in bundle (built-in: {', '.join(known) or 'none installed yet'}). "
                     "Pass a bundle folder with --model.")


def _read_metadata(root: Path) -> dict:
    f = root / METADATA_FILE
    try:
        md = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot read bundle metadata {f}: {e}.") from e
    if md.get("schema") != SCHEMA:
        raise ModelError(f"{f}: schema {md.get('schema')!r} is not {SCHEMA!r}; re-export the "
                         "bundle with dicompipe.model.save_bundle.")
    for key in ("name", "organ", "labels", "weights"):
        if key not in md:
            raise ModelError(f"{f}: missing {key!r}.")
    if not (md["weights"] or {}).get("file") or not md["weights"].get("sha256"):
        raise ModelError(f"{f}: 'weights' needs 'file' and 'sha256'.")
    region = (md.get("preprocessing") or {}).get("input_region")
    if region and region not in INPUT_REGIONS:
        raise ModelError(f"{f}: preprocessing.input_region {region!r} is not one this dicompipe "
                         f"renders ({', '.join(INPUT_REGIONS)}): the bundle needs a newer dicompipe.")
    return md


def read_weights(path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or .pt/.pth via ``torch.load(weights_only=True)``."""
    import torch
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ModelError(f"Weights file {p} not found.") from e
    except Exception as e:  # safetensors / unpickler errors are untyped
        raise ModelError(f"Cannot read weights {p}: {e}. Only safetensors files or plain "
                         "tensor state dicts (torch.save of a dict) are accepted.") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{p} does not hold a state dict of tensors.")
    return obj


def resnet50_from_torchvision(weights, num_classes: int, in_channels: int = 3) -> torch.nn.Module:
    """A dicompipe ResNet50 initialised from a torchvision resnet50 state dict (file or dict).

    Typical use: ImageNet weights a user already has (``resnet50-0676ba61.pth``) as the
    starting point for training. The head is left random (class counts differ).

    >>> net = resnet50_from_torchvision("resnet50-0676ba61.pth", num_classes=3)
    """
    state = weights if isinstance(weights, Mapping) else read_weights(weights)
    from dicompipe.model.network import load_torchvision_weights, resnet50
    net = resnet50(num_classes=num_classes, in_channels=in_channels)
    not_loaded = load_torchvision_weights(net, dict(state))
    body = [k for k in net.state_dict() if not k.startswith("fc.")]
    if len(not_loaded) > len(body) // 2:
        raise ModelError(f"{weights if not isinstance(weights, Mapping) else 'The state dict'} does "
                         f"not look like a torchvision resnet50 ({len(not_loaded)} of {len(body)} "
                         f"tensors did not match by name/shape, e.g. {not_loaded[:3]}).")
    return net


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
