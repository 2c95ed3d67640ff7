"""OpenVINO backend: the cached ONNX exports of a bundle compiled by OpenVINO for the CPU.

Same contract as the other backends: ``x (N, C, H, W) float32 -> (logits, layer4)``.
Precisions:

- ``fp32``: the fp32 export at f32 inference precision (agrees with torch within float
  rounding, like ONNX Runtime fp32);
- ``bf16``: the fp32 export run in bfloat16 — fast only where the CPU has native bf16
  (AMX or AVX512-BF16), so it is refused elsewhere. Reduced precision: opt-in, judged by
  ``benchmarks/int8_eval.py`` on the leak-free test split like int8;
- ``int8``: the bundle's int8 QDQ model (the same file and calibration gate as ONNX
  Runtime int8), run on OpenVINO's int8 kernels (VNNI/AMX).

Compiled models are cached (OpenVINO ``CACHE_DIR``) in the user cache,
``$DICOMPIPE_CACHE/openvino/<runtime version>-<CPU key>`` (else ``~/.cache/dicompipe/...``):
the first run on a machine compiles, later runs load the compiled blob. The exported file's
name holds the bundle's sha256, the folder the runtime version and a hash of the CPU model
and its instruction-set flags, so a shared home directory never serves one CPU's blob to
another. ``DICOMPIPE_OV_CACHE=0`` turns the cache off.

Install with ``pip install dicompipe[openvino]``.

Example::

    >>> run = OpenVinoBackend(load_bundle("pancreas-resnet50"), precision="int8")
    >>> logits, layer4 = run(batch.tensors[:16])
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openvino as ov  # noqa: E402  (ImportError here = extra not installed; get_backend says so)

from dicompipe.errors import ModelError
from dicompipe.model.onnx_backend import export, quantize
from dicompipe.util import cpu_key, physical_cores, user_cache, writable

PRECISIONS = ("fp32", "bf16", "int8")


def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has native bf16 on this machine (AMX / AVX512-BF16)."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_cache_dir() -> Path | None:
    """The compiled-model cache folder for this runtime and CPU, or None (off/unwritable)."""
    if os.environ.get("DICOMPIPE_OV_CACHE", "1") == "0":
        return None
    folder = user_cache("openvino") / f"{ov.get_version().split('-')[0]}-{cpu_key()}"
    return folder if writable(folder) else None


class OpenVinoBackend:
    """OpenVINO callable on CPU. ``threads``: inference threads (default: physical cores,
    ``$DICOMPIPE_THREADS`` overrides). ``path``: compile this .onnx instead of the cache."""

    def __init__(self, bundle, device: str = "cpu", precision: str = "fp32", *,
                 threads: int | None = None, path: str | Path | None = None):
        if precision not in PRECISIONS:
            raise ModelError(f"Unknown precision {precision!r} for OpenVINO: use "
                             f"{', '.join(PRECISIONS)}.")
        if device not in (None, "", "auto", "cpu"):
            raise ModelError(f"The OpenVINO backend runs on the CPU only, not {device!r}: use "
                             "--backend torch for a GPU.")
        if precision == "bf16" and not native_bf16():
            raise ModelError("This CPU has no native bfloat16 (AMX or AVX512-BF16): use "
                             "--backend openvino (fp32) or onnx.")
        self.device, self.precision = "cpu", precision
        self.name = "openvino" if precision == "fp32" else f"openvino-{precision}"
        if path is None:
            path = quantize(bundle, backend="openvino-int8") if precision == "int8" else export(bundle)
        self.path = Path(path)
        self.threads = int(threads or os.environ.get("DICOMPIPE_THREADS") or physical_cores())
        # THROUGHPUT: OpenVINO runs several single-threaded streams (2 on 2 cores), each call's
        # slices are split across them. Same numbers as one 2-thread request, 4 % more slices/s
        # (int8, 160 px), and no thread barrier stalls while preprocessing renders the next
        # rows on the same cores (300-slice study, predict 4.05 s against 4.52 s)
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "THROUGHPUT",
                  # fp32 and int8 keep f32 for what is not quantized; bf16 asks for bf16
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        self.cache_dir = compile_cache_dir()
        if self.cache_dir is not None:
            config["CACHE_DIR"] = str(self.cache_dir)
        try:
            # from the path, so that a cached blob is imported without reading the model
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
            raise ModelError(f"OpenVINO cannot compile {self.path}: {e}. Delete the file (it "
                             "is rebuilt) or use --backend onnx.") from e
        if len(self.compiled.outputs) != 2:
            raise ModelError(f"{self.path} has {len(self.compiled.outputs)} outputs; expected "
                             "(logits, layer4).")
        n = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.requests = [self.compiled.create_infer_request() for _ in range(n)]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [p for p in np.array_split(x, len(self.requests)) if len(p)] or [x]
        running = self.requests[:len(parts)]
        for req, part in zip(running, parts):
            req.start_async({0: part})
        outs: list[np.ndarray] = []
        start = 0
        for req, part in zip(running, parts):
            req.wait()
            # copied once, into the call's result: the request's buffers serve the next call
            for k, o in enumerate(self.compiled.outputs):
                data = req.get_tensor(o).data
                if len(outs) <= k:
                    outs.append(np.empty((len(x),) + data.shape[1:], np.float32))
                outs[k][start:start + len(part)] = data
            start += len(part)
        return outs[0], outs[1]

    def __repr__(self) -> str:
        return f"OpenVinoBackend({self.path.name}, {self.precision}, threads={self.threads})"
