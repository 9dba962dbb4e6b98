"""What every benchmark shares: the machine description, timers that synchronise the device, memory probes,
and the table / CSV / JSON writers.

Benchmarks use fxcache's public API only; this module knows nothing of fxcache but its version.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Memory",
    "call_seconds",
    "fmt",
    "jsonable",
    "log",
    "machine",
    "median_seconds",
    "percentile",
    "peak_rss_mib",
    "reset_peak_rss",
    "rss_mib",
    "sync",
    "table",
    "version",
    "write_csv",
    "write_json",
]


def log(msg: str) -> None:
    print(msg, flush=True)


# -- the machine ------------------------------------------------------------------------------------


def version(*dists: str) -> str:
    """The installed version of the first of ``dists`` that is installed, else ``"not installed"``."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def machine() -> dict[str, Any]:
    """Host CPU, core and thread counts, Python and library versions, and the load average at the start."""
    import fxcache

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "DeepCache": version("DeepCache"),
        "fxcache": fxcache.__version__,
        "load_average_1min_at_start": os.getloadavg()[0],  # > ~0.5: something else is competing for the cores
    }


# -- timing -------------------------------------------------------------------------------------------


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work: a timer must not stop before the work it times has run."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], reps: int, device: torch.device | str | None = None) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls, each between two device syncs, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def call_seconds(fn: Callable[[], Any], reps: int, warmup: int = 1, device: torch.device | str | None = None) -> float:
    """Mean seconds of ``fn()`` over ``reps`` calls between two device syncs, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


# -- memory -------------------------------------------------------------------------------------------


def _status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS; False where that is not possible."""
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak resident memory since the start or the last :func:`reset_peak_rss`."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    return _status_mib("VmRSS") or 0.0


class Memory:
    """Memory of one device: PyTorch's CUDA allocator on CUDA, the process's resident set elsewhere."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peak_resets = self.cuda or reset_peak_rss()  # whether peak() can be measured from a reset

    def now_mib(self) -> float:
        return torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else rss_mib()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak_mib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else peak_rss_mib()


# -- quality ------------------------------------------------------------------------------------------


def latent_psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR of latents against a reference run's; latents have no fixed range, so the peak is the reference's
    (max - min)."""
    from fxcache.metrics import psnr

    return float(psnr(ref, x, data_range=float(ref.max() - ref.min())))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (0..100), linear between the closest ranks; NaN when empty.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
        2.5
    """
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- reporting ------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3f") -> str:
    """A table cell: '' for None, yes/NO for booleans, ``spec`` for floats."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else format(value, spec)
    return str(value)


def table(head: list[str], body: list[list[str]]) -> str:
    """A fixed-width text table with a rule under the header."""
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as strings: strict JSON has no Infinity/NaN (a PSNR of identical
    latents is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(dict(data)), indent=2, allow_nan=False) + "\n")
    return path


def write_csv(path: Path, fieldnames: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """One CSV row per measurement; callers put the run's context (device, versions, shapes) on every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames))
        writer.writeheader()
        for r in rows:
            writer.writerow(dict(r))
    return path
