"""ONNX Runtime inference backend (optional extra ``pip install dicompipe[fast]``).

The bundle's ResNet50 is exported once through :class:`~dicompipe.model.network.WithFeatures`
with two outputs, ``logits`` (N, K) and ``layer4`` (N, 2048, h, w), dynamic batch and image
size, opset 17, so the closed-form Grad-CAM works on its output unchanged. The ``.onnx`` is
cached, keyed by the weights' sha256 (a change of weights means a new file, the stale one is
removed):

- next to a user bundle: ``BUNDLE/models/onnx/<sha256>.<precision>.onnx`` when writable
  (int8: ``int8-<hash of the calibration ranges>``, so new ranges make a new file);
- otherwise (built-in bundles inside the package, read-only folders) in the user cache
  ``$DICOMPIPE_CACHE`` or ``$XDG_CACHE_HOME/dicompipe/onnx`` (``~/.cache/dicompipe/onnx``).

Every file is written to a temporary name in the target folder and renamed (atomic).
ONNX Runtime's graph optimisation (about 0.3 s per process for ResNet50) is cached as well:
the optimised model is saved once per export, runtime version and CPU under
``$DICOMPIPE_CACHE/onnx-optimized`` (``DICOMPIPE_ORT_CACHE=0`` turns that off).

``precision="int8"``: ONNX Runtime static quantization (QDQ, per-channel int8 weights,
uint8 activations, MinMax ranges). The activation ranges come from the bundle's
``models/int8_calibration.json`` (written by ``benchmarks/int8_eval.py`` from a few hundred
rendered training slices, and only when int8 passed the accuracy gate), so no data are needed
at run time. Without that file, or when its ``validated`` list names only OpenVINO int8, int8
is refused with a :class:`ModelError`.

Example::

    >>> run = OnnxBackend(load_bundle("lung-resnet50"))        # exports on first use
    >>> logits, layer4 = run(np.zeros((2, 3, 224, 224), np.float32))
    >>> run.name, run.device, run.path.name
    ('onnx', 'cpu', '3f1c...e2.fp32.onnx')
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicompipe.errors import ModelError
from dicompipe.util import atomic_path, cpu_key, physical_cores, user_cache, writable

if TYPE_CHECKING:       # imported where used: the OpenVINO path loads its cached blob without it
    import onnxruntime as ort

OPSET = 17
#: bump when the export recipe changes so cached files are rebuilt
EXPORT_VERSION = 1
PRECISIONS = ("fp32", "int8")
CALIBRATION_FILE = "models/int8_calibration.json"
INPUT, OUTPUTS = "x", ("logits", "layer4")


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options tuned for CPU inference of one CNN: one intra-op thread per physical core
    (``$DICOMPIPE_THREADS`` overrides), sequential execution, every graph optimisation, and
    no busy-wait spinning between ops: ResNet50 ops are long enough that spinning buys
    nothing, while it steals cores from the reader/renderer threads and from other
    processes on a small shared CPU (``DICOMPIPE_ORT_SPIN=1`` turns it back on)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or os.environ.get("DICOMPIPE_THREADS") or physical_cores())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no CPU arena: the arena keeps its high-water mark (~0.5 GB at batch 32) for the life of
    # the session, on top of what Grad-CAM and the reports allocate next; measured no slower
    so.enable_cpu_mem_arena = False
    spin = "1" if os.environ.get("DICOMPIPE_ORT_SPIN", "0") == "1" else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


# --------------------------------------------------------------------------- cache
def cache_dir(bundle) -> Path:
    """Where ``bundle``'s exports live: beside a writable user bundle, else the user cache.

    Built-in bundles (inside the installed package) always use the user cache, so a
    source checkout never grows 100 MB build products under version control.
    """
    from dicompipe.model.bundle import BUILTIN_DIR

    root = Path(bundle.path).resolve()
    builtin = BUILTIN_DIR.resolve() in (root, *root.parents)
    if not builtin and writable(root / "models" / "onnx"):
        return root / "models" / "onnx"
    d = user_cache("onnx")
    if not writable(d):
        raise ModelError(f"Cannot write the ONNX export for bundle {bundle.name!r}: neither "
                         f"{root / 'models' / 'onnx'} nor {d} is writable. Set $DICOMPIPE_CACHE "
                         "to a writable folder or use --backend torch.")
    return d


def model_path(bundle, precision: str = "fp32") -> Path:
    """The cache file for ``bundle`` at ``precision`` (it may not exist yet). The name holds
    the architecture as well as the weights: a dilated layer4 has the same weight shapes."""
    arch = (f".l4d{bundle.layer4_dilation}" if bundle.layer4_dilation != 1 else "") + (
        f".top{bundle.abnormal_top:g}" if bundle.abnormal_top else "")
    return cache_dir(bundle) / f"{bundle.sha256}.v{EXPORT_VERSION}{arch}.{precision}.onnx"


@contextlib.contextmanager
def _atomic(target: Path):
    """:func:`dicompipe.util.atomic_path` for a cache file whose folder may not exist yet."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".tmp") as tmp:
        yield tmp


def _remove_stale(target: Path, precision: str) -> None:
    """Drop exports of this precision made from other weights/recipes in the same folder
    (only beside a bundle: the shared user cache may serve several bundles)."""
    if target.parent.name != "onnx" or target.parent.parent.name != "models":
        return
    for old in target.parent.glob(f"*.{precision}*.onnx"):
        if old != target:
            with contextlib.suppress(OSError):
                old.unlink()


# --------------------------------------------------------------------------- export
def export(bundle, path: Path | None = None) -> Path:
    """Export ``bundle``'s network to ONNX fp32 (cached; returns the file).

    Two outputs (logits, layer4), dynamic batch/height/width, opset 17, constants folded,
    then ORT's offline pre-processing (shape inference, BN folding) so that the file also
    quantizes well. Rebuilt when the weights' sha256 or the export recipe changes.
    """
    path = Path(path) if path else model_path(bundle, "fp32")
    if path.is_file():
        return path
    import torch

    from dicompipe.model.network import WithFeatures

    net = bundle.network()
    spec = bundle.spec
    x = torch.zeros(1, spec.channels, spec.size, spec.size)
    with _atomic(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = tmp.with_name(tmp.name + ".raw.onnx")
        try:
            kw = dict(input_names=[INPUT], output_names=list(OUTPUTS), opset_version=OPSET,
                      do_constant_folding=True,
                      dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                                    "logits": {0: "batch"},
                                    "layer4": {0: "batch", 2: "h", 3: "w"}})
            with torch.no_grad():
                try:   # TorchScript exporter: 2x faster to export, clean graph for a CNN
                    torch.onnx.export(WithFeatures(net).eval(), (x,), str(raw), dynamo=False, **kw)
                except Exception:  # pragma: no cover - future torch without the legacy exporter
                    kw.pop("dynamic_axes")
                    b = torch.export.Dim("batch", min=1, max=65536)
                    torch.onnx.export(WithFeatures(net).eval(), (x,), str(raw), dynamo=True,
                                      dynamic_shapes={"x": {0: b}}, external_data=False, **kw)
            _preprocess(raw, tmp)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"Exporting bundle {bundle.name!r} to ONNX failed: {e}. "
                             "Use --backend torch.") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                raw.unlink()
    _remove_stale(path, "fp32")
    return path


def _preprocess(src: Path, dst: Path) -> None:
    """ORT's quantization pre-processing: basic graph optimisation + shape inference.

    Removes the exporter's Identity aliases, folds what is left of BatchNorm, and stores
    value shapes; harmless for fp32 and required for good int8 kernels."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except Exception:  # pragma: no cover - keep the plain export then
            onnx.save(onnx.load(str(src)), str(dst))


def calibration_path(bundle) -> Path:
    return Path(bundle.path) / CALIBRATION_FILE


def quantize(bundle, path: Path | None = None, calibration: Path | None = None,
             backend: str = "onnx-int8") -> Path:
    """The int8 (QDQ, per-channel) model of ``bundle`` from its stored calibration ranges,
    for ``backend`` ("onnx-int8" or "openvino-int8"): refused when the calibration lists the
    backends that passed the accuracy gate and this one is not among them (the same QDQ file
    can pass on one runtime's int8 kernels and fail on another's)."""
    cal = Path(calibration) if calibration else calibration_path(bundle)
    if not cal.is_file():
        raise ModelError(
            f"Bundle {bundle.name!r} ships no int8 calibration ({cal}): int8 was not validated "
            "for it (see benchmarks/int8_eval.py). Use precision fp32.")
    data = json.loads(cal.read_text())
    if data.get("sha256") != bundle.sha256:
        raise ModelError(f"{cal} was calibrated for other weights (sha256 "
                         f"{str(data.get('sha256'))[:12]}…, bundle {bundle.sha256[:12]}…): "
                         "re-run benchmarks/int8_eval.py or use precision fp32.")
    validated = data.get("validated")               # absent: files from before, valid for all
    if validated is not None and backend not in validated:
        raise ModelError(f"int8 of bundle {bundle.name!r} passed the accuracy gate only as "
                         f"{', '.join(validated)}, not as {backend} (see {cal.name}): use "
                         f"--backend {validated[0]} or fp32.")
    # the ranges are part of the model: a new calibration must not reuse an old int8 file
    ranges_key = hashlib.sha256(cal.read_bytes()).hexdigest()[:12]
    path = Path(path) if path else model_path(bundle, f"int8-{ranges_key}")
    if path.is_file():
        return path
    fp32 = export(bundle)
    with _atomic(path) as tmp, tempfile.TemporaryDirectory() as td:
        ranges = Path(td) / "ranges.json"
        ranges.write_text(json.dumps(data["tensors"]))
        # files from before float_nodes quantized every node
        quantize_static_file(fp32, tmp, calibration_cache=ranges, float_nodes=data.get("float_nodes", ()))
    _remove_stale(path, "int8")
    return path


def classifier_nodes(path: Path) -> list[str]:
    """Names of the classifier's matrix products (Gemm/MatMul after the last Conv) in an ONNX
    export, which int8 keeps in float (weights and bias; the pooled features still arrive as
    8-bit): a few kFLOPs, and an 8-bit classifier is what reordered close slice scores (lung
    rc.1: a0001 tumour-slice AUROC 0.80 -> 0.75 with it in int8, 0.80 in float).

    >>> classifier_nodes(export(bundle))          # ['/fc/Gemm']
    """
    import onnx
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    last_conv = max((i for i, n in enumerate(nodes) if n.op_type == "Conv"), default=-1)
    return [n.name for n in nodes[last_conv + 1:] if n.op_type in ("Gemm", "MatMul")]


def quantize_static_file(src: Path, dst: Path, reader=None, calibration_cache: Path | None = None,
                         float_nodes=()):
    """ORT static quantization with dicompipe's settings (QDQ, per-channel int8 weights,
    uint8 activations — the fast choice on VNNI/AMX x86 —, MinMax ranges).

    ``reader``: a CalibrationDataReader; or ``calibration_cache``: an existing ranges JSON
    (then no data are needed); with both, the ranges computed from ``reader`` are written there.
    ``float_nodes``: nodes left unquantized (see :func:`classifier_nodes`).
    """
    import inspect
    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration_cache and "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ModelError(f"int8 from stored calibration ranges needs a newer onnxruntime (this is "
                         f"{ort.__version__}: quantize_static has no calibration_cache_path); "
                         "upgrade onnxruntime or use precision fp32.")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=str(calibration_cache) if calibration_cache else None,
                        nodes_to_exclude=list(float_nodes))
    finally:
        logging.getLogger().setLevel(level)


# --------------------------------------------------------------------------- backend
class OnnxBackend:
    """ONNX Runtime callable ``x (N, C, H, W) float32 -> (logits (N, K), layer4 (N, 2048, h, w))``.

    ``device``: "cpu" (or "cuda" when onnxruntime-gpu is installed). ``precision``: "fp32"
    or "int8" (only for bundles that ship an int8 calibration). ``threads``: intra-op
    threads (default: physical cores). ``path``: use this .onnx instead of the cache.
    """

    name = "onnx"

    def __init__(self, bundle, device: str = "cpu", precision: str = "fp32", *,
                 threads: int | None = None, path: str | Path | None = None):
        import onnxruntime as ort
        if precision not in PRECISIONS:
            raise ModelError(f"Unknown precision {precision!r}: use {' or '.join(PRECISIONS)}.")
        self.device = "cpu" if device in (None, "", "auto") else str(device)
        self.precision = precision
        self.name = "onnx" if precision == "fp32" else f"onnx-{precision}"
        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelError("ONNX Runtime has no CUDA provider here (install "
                                 "onnxruntime-gpu) — use --backend torch on a GPU.")
            idx = int(self.device.split(":")[1]) if ":" in self.device else 0
            providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
        elif self.device != "cpu":
            raise ModelError(f"Unknown device {device!r} for the ONNX backend: use cpu.")
        if path is None:
            path = export(bundle) if precision == "fp32" else quantize(bundle)
        self.path = Path(path)
        self.options = session_options(threads)
        self.threads = self.options.intra_op_num_threads
        try:
            self.session = self._cached_session(providers) if self.device == "cpu" else None
            if self.session is None:
                self.session = ort.InferenceSession(str(self.path), self.options, providers=providers)
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load {self.path}: {e}. Delete the file "
                             "(it is rebuilt) or use --backend torch.") from e
        self._input = self.session.get_inputs()[0].name
        self._outputs = [o.name for o in self.session.get_outputs()]
        if len(self._outputs) != 2:
            raise ModelError(f"{self.path} has outputs {self._outputs}; expected (logits, layer4).")

    def _cached_session(self, providers):
        """The session from ONNX Runtime's optimised model file in the user cache (keyed by
        the export's name, size and modification time, the runtime version and the CPU, as
        the optimised graph is CPU specific); the first run optimises and saves it, and drops
        the one made from an earlier file of the same name (a re-export). None when the cache
        is off (``DICOMPIPE_ORT_CACHE=0``) or not writable."""
        import onnxruntime as ort
        if os.environ.get("DICOMPIPE_ORT_CACHE", "1") == "0":
            return None
        folder = user_cache("onnx-optimized") / f"{ort.__version__}-{cpu_key()}"
        if not writable(folder):
            return None
        st = self.path.stat()
        target = folder / f"{self.path.stem}.{st.st_size:x}-{st.st_mtime_ns:x}.opt.onnx"
        for old in folder.glob(f"{self.path.stem}.*opt.onnx"):
            if old != target:
                old.unlink(missing_ok=True)
        if target.exists():
            so = session_options(self.threads)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return ort.InferenceSession(str(target), so, providers=providers)
        with _atomic(target) as tmp:
            self.options.optimized_model_filepath = str(tmp)
            session = ort.InferenceSession(str(self.path), self.options, providers=providers)
        return session

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        logits, layer4 = self.session.run(self._outputs, {self._input: x})
        return logits, layer4

    def __repr__(self) -> str:
        return f"OnnxBackend({self.path.name}, {self.device}, {self.precision}, threads={self.threads})"
