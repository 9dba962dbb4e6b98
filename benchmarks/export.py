"""Ahead-of-time package against in-process compilation: start-up and steady-state step times.

    python -m benchmarks.export [--size 32] [--batch 8] [--steps 25] [--interval 3] [--branch 0] [--out DIR]
    python -m benchmarks.export --quick      # smoke run: batch 2, 8 steps, fewer repetitions

(from the repository root). Model: fxcache's shipped demo U-Net (a diffusers ``UNet2DModel``, 1.09M parameters,
trained at 32x32; ``fxcache.demo.toy.load_demo_unet``), fp32 on CPU, one timestep per call. Two methods:

    compiled   fxcache.transform(unet, branch=B, interval=N, compile=True): capture and torch.compile (Inductor)
               in this process, at the first full and the first shallow call
    loaded     fxcache.export(...) once, then fxcache.load(path): AOTInductor's package, no model code

Measured, in this order (so that the in-process compile cannot reuse kernels the export compiled; Inductor's
caches point at a fresh temporary directory):

1. start-up of ``compiled``: transform, then the first full and the first shallow call (capture + compile);
2. the export (capture + two AOTInductor compiles + packaging) and the package's size;
3. start-up of ``loaded``: ``fxcache.load`` plus the first full and shallow calls, in this process, and the
   same in a fresh Python process (``import fxcache`` included);
4. steady state, interleaved over ``--rounds``: a full step and a shallow step (median of ``--reps`` calls
   each), and a whole generation of ``--steps`` calls at interval N; medians over rounds;
5. agreement: the largest relative difference of the loaded outputs from eager fxcache over one generation.

Writes ``<out>/<run>.json`` and ``.csv`` naming the machine, versions, dtype, shapes and steps. On a shared CPU
the timings are approximate: ``load_average_1min_at_start`` in the JSON says how busy it was.
"""

from __future__ import annotations

import os
import tempfile

# Before torch is imported: compile from scratch, in a cache of this run's own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fxcache_bench_export_inductor_"))

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import fxcache  # noqa: E402
from benchmarks.common import fmt, log, machine, median_seconds, table, write_csv, write_json  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    """What one run measures."""

    size: int = 32  # pixels (the demo model's resolution)
    batch: int = 8
    steps: int = 25  # calls per generation
    interval: int = 3
    branch: int = 0
    reps: int = 20  # calls per step-time median
    rounds: int = 3  # interleaved rounds of steady-state measurements

    @property
    def name(self) -> str:
        return f"export_b{self.batch}_{self.size}px_N{self.interval}_br{self.branch}_{self.steps}steps"


def _inputs(sc: Scenario) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sc.batch, 3, sc.size, sc.size, generator=g)
    ts = [torch.tensor(int(t)) for t in torch.linspace(999, 0, sc.steps)]
    return x, ts


def _generation(model: Any, x: torch.Tensor, ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every output of one generation; a toy update makes each input depend on the last output."""
    outs = []
    with torch.no_grad():
        for t in ts:
            out = model(x, t)
            out = out[0] if isinstance(out, tuple) else out.sample
            x = x - 0.05 * out
            outs.append(out)
    return outs


def _first_calls(model: Any, x: torch.Tensor, ts: list[torch.Tensor]) -> None:
    model.reset()
    with torch.no_grad():
        model(x, ts[0])  # full
        model(x, ts[1])  # shallow (interval >= 2)


def _step_seconds(model: Any, x: torch.Tensor, t: torch.Tensor, interval: int, reps: int) -> float:
    """Median seconds of one full (``interval=1``) or shallow (a huge interval) call; same timestep: one generation."""
    model.configure(interval=interval)
    model.reset()

    def call() -> None:
        with torch.no_grad():
            model(x, t)

    call()  # the generation's first call is full; the ones timed follow the schedule
    return median_seconds(call, reps)


def _fresh_process_startup(path: Path, sc: Scenario) -> float:
    code = (
        "import time; start = time.perf_counter()\n"
        "import torch, fxcache\n"
        f"r = fxcache.load({str(path)!r})\n"
        f"x = torch.randn({sc.batch}, 3, {sc.size}, {sc.size})\n"
        "with torch.no_grad():\n"
        "    r(x, torch.tensor(999)); r(x, torch.tensor(998))\n"
        "print(time.perf_counter() - start)\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log(f"  fresh process: {float(out.stdout.split()[-1]):.2f} s inside Python, {wall:.2f} s wall")
    return wall


def run(sc: Scenario, out_dir: Path) -> dict[str, Any]:
    from fxcache.demo.toy import load_demo_unet

    env = machine()
    unet = load_demo_unet()
    x, ts = _inputs(sc)
    rows: dict[str, dict[str, Any]] = {m: {"method": m} for m in ("compiled", "loaded")}

    log("1. compiled: capture + torch.compile at the first full and shallow calls")
    start = time.perf_counter()
    compiled = fxcache.transform(unet, branch=sc.branch, interval=sc.interval, compile=True)
    _first_calls(compiled, x, ts)
    rows["compiled"]["startup_s"] = time.perf_counter() - start

    log("2. export")
    with tempfile.TemporaryDirectory(prefix="fxcache_bench_export_") as tmp:
        path = Path(tmp) / "demo_unet.pt2"
        start = time.perf_counter()
        fxcache.export(fxcache.transform(unet, branch=sc.branch, interval=sc.interval), path, (x, ts[0]))
        export_s = time.perf_counter() - start
        size_mib = path.stat().st_size / 2**20
        params_mib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
        log(f"  {export_s:.1f} s, {size_mib:.2f} MiB package ({params_mib:.2f} MiB of parameters)")

        log("3. loaded: fxcache.load + the first full and shallow calls")
        start = time.perf_counter()
        loaded = fxcache.load(path)
        _first_calls(loaded, x, ts)
        rows["loaded"]["startup_s"] = time.perf_counter() - start
        rows["loaded"]["startup_fresh_process_s"] = _fresh_process_startup(path, sc)

        log(f"4. steady state, {sc.rounds} interleaved rounds")
        samples: dict[tuple[str, str], list[float]] = {}
        models = {"compiled": compiled, "loaded": loaded}
        for r in range(sc.rounds):
            for name, model in models.items():
                samples.setdefault((name, "full_ms"), []).append(1e3 * _step_seconds(model, x, ts[0], 1, sc.reps))
                samples.setdefault((name, "shallow_ms"), []).append(
                    1e3 * _step_seconds(model, x, ts[0], 10**9, sc.reps)
                )
                model.configure(interval=sc.interval)
                model.reset()
                start = time.perf_counter()
                _generation(model, x, ts)
                samples.setdefault((name, "generation_s"), []).append(time.perf_counter() - start)
            log(f"  round {r + 1} done")
        for (name, key), values in samples.items():
            rows[name][key] = statistics.median(values)
        for row in rows.values():
            row["shallow_over_full"] = row["shallow_ms"] / row["full_ms"]

        log("5. agreement with eager fxcache over one generation")
        eager = _generation(fxcache.transform(unet, branch=sc.branch, interval=sc.interval), x, ts)
        for name, model in models.items():
            model.reset()
            outs = _generation(model, x, ts)
            rows[name]["max_rel_diff_vs_eager"] = max(
                ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs, eager, strict=True)
            )

    head = ["method", "startup s", "full ms", "shallow ms", "shallow/full", "generation s", "max rel diff"]
    body = [
        [
            r["method"],
            fmt(r["startup_s"], ".2f"),
            fmt(r["full_ms"], ".2f"),
            fmt(r["shallow_ms"], ".2f"),
            fmt(r["shallow_over_full"], ".3f"),
            fmt(r["generation_s"], ".3f"),
            fmt(r["max_rel_diff_vs_eager"], ".1e"),
        ]
        for r in rows.values()
    ]
    log("\n" + table(head, body))
    log(
        f"export {export_s:.1f} s; package {size_mib:.2f} MiB; loaded start-up in a fresh process "
        f"{rows['loaded']['startup_fresh_process_s']:.2f} s (wall, import included)"
    )
    context = {**asdict(sc), "run": sc.name, "dtype": "float32", "device": "cpu", "model": "demo UNet2DModel"}
    result = {
        "scenario": context,
        "machine": env,
        "export_s": export_s,
        "package_mib": size_mib,
        "parameters_mib": params_mib,
        "rows": list(rows.values()),
    }
    write_json(out_dir / f"{sc.name}.json", result)
    fields = ["run", "method", "startup_s", "startup_fresh_process_s", "full_ms", "shallow_ms", "shallow_over_full"]
    fields += ["generation_s", "max_rel_diff_vs_eager", "torch", "batch", "size", "steps", "interval", "branch"]
    write_csv(
        out_dir / f"{sc.name}.csv",
        fields,
        ({k: v for k, v in {**context, **r, "torch": env["torch"]}.items() if k in fields} for r in rows.values()),
    )
    log(f"wrote {out_dir / sc.name}.json and .csv")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Scenario()
    parser.add_argument("--size", type=int, default=d.size)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--interval", type=int, default=d.interval)
    parser.add_argument("--branch", type=int, default=d.branch)
    parser.add_argument("--reps", type=int, default=d.reps)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--quick", action="store_true", help="batch 2, 8 steps, 5 reps, 1 round")
    a = parser.parse_args(argv)
    if a.interval < 2:
        parser.error("--interval must be >= 2 (the start-up measures a shallow call)")
    sc = Scenario(a.size, a.batch, a.steps, a.interval, a.branch, a.reps, a.rounds)
    if a.quick:
        sc = Scenario(a.size, 2, 8, a.interval, a.branch, 5, 1)
    torch.manual_seed(0)
    run(sc, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
