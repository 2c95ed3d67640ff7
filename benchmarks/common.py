"""Timing helpers shared by the benchmark suite: medians with ranges, interleaved
comparisons, peak RSS, the machine description and the measured sgemm peak.

Every figure is the median of ``repeats`` timed runs (after ``warmup`` untimed ones) with
its min..max range. Comparisons are *interleaved* (A, B, C, A, B, C, ...) so that a
background load hits every contender alike and their ratio stays meaningful on a busy box.

Example::

    >>> from benchmarks.common import interleaved
    >>> r = interleaved({"a": f, "b": g}, repeats=5)
    >>> r["a"].median, r["a"].lo, r["a"].hi           # seconds
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# scratch (gitignored): synthetic studies, bundles; $DICOMPIPE_BENCH_WORK moves it (the tests do)
WORK = Path(os.environ.get("DICOMPIPE_BENCH_WORK") or ROOT / "benchmarks" / "_work")
RESULTS = ROOT / "benchmarks" / "results"

#: ResNet50 forward at 224x224 with the stride-2 stem: 4.1 GMAC = 8.2 GFLOP per image
RESNET50_GFLOP_224 = 8.2


@dataclass
class Timing:
    """Seconds per call: median and range over the timed repeats."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def lo(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def hi(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def rate(self, n: float = 1.0) -> Rate:
        """Items per second (n items per call): median and range."""
        return Rate(n / self.median, n / self.hi, n / self.lo)

    def to_dict(self) -> dict:
        return {"median_s": round(self.median, 5), "min_s": round(self.lo, 5),
                "max_s": round(self.hi, 5), "repeats": len(self.samples),
                "samples_s": [round(s, 5) for s in self.samples]}


@dataclass
class Rate:
    median: float
    lo: float
    hi: float

    def to_dict(self) -> dict:
        return {"median": round(self.median, 3), "min": round(self.lo, 3), "max": round(self.hi, 3)}

    def fmt(self, unit: str = "") -> str:
        return f"{self.median:.1f}{unit} [{self.lo:.1f}-{self.hi:.1f}]"


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Median-of-repeats timing of one callable."""
    return interleaved({"_": fn}, repeats, warmup)["_"]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5,
                warmup: int = 1) -> dict[str, Timing]:
    """Time several callables round-robin (each warmed up first); returns name -> Timing."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {k: Timing() for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[k].samples.append(time.perf_counter() - t)
    return out


# --------------------------------------------------------------------------- machine
def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """A hostname-free description of this machine; ``id`` names the results file."""
    from dicompipe.util import physical_cores
    cores = physical_cores()
    flags = _cpu_flags()
    isa = next((name for name, flag in [("amx", "amx_tile"), ("avx512", "avx512f"),
                                         ("avx2", "avx2"), ("neon", "asimd")] if flag in flags),
               platform.machine())
    extras = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                          "amx_tile", "amx_int8", "amx_bf16") if f in flags]
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = float("nan")
    import numpy
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__}
    try:
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return {"id": f"cpu-{cores}core-{isa}", "cpu": _cpu_model(), "physical_cores": cores,
            "logical_cpus": os.cpu_count(), "isa": extras, "memory_gb": round(mem_gb, 1),
            "os": f"{platform.system()} {platform.release()}", "versions": versions,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def sgemm_peak(n: int = 4096, repeats: int = 5) -> dict:
    """Measured fp32 GEMM throughput (torch.mm of n x n matrices, all cores): GFLOP/s."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: torch.mm(a, b), repeats=repeats, warmup=1)
    flop = 2.0 * n ** 3 / 1e9
    r = t.rate(flop)
    return {"n": n, "threads": torch.get_num_threads(), "gflops": r.to_dict(), **t.to_dict()}


def write_json(obj: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default) + "\n")
    tmp.replace(path)
    return path


def _default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cols = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(header), line(["-" * x for x in w])] + [line(r) for r in cols[1:]])
