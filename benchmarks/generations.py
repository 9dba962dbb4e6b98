"""Per-request state: memory over many generations and shapes, and what interleaving generations costs.

    python -m benchmarks.generations [--generations 200] [--shapes 10] [--steps 10] [--max-plans 8] [--out DIR]
    python -m benchmarks.generations --quick     # 20 generations: a smoke run

(from the repository root). Model: fxcache's shipped demo U-Net (a diffusers ``UNet2DModel``, 1.09M parameters;
``fxcache.demo.toy.load_demo_unet``), fp32 on CPU, eager graphs, branch 0, interval 3.

1. Memory. ``--generations`` generations of ``--steps`` calls each, cycling through ``--shapes`` input shapes
   (batch 1 or 2 at 16, 24, ... px) on one ``fxcache.transform`` module that keeps ``--max-plans`` plans (the
   default, 8): with 10 shapes in turn every generation evicts a plan and captures again, the worst case for a
   leak. Each generation runs inside ``with cached.generation():``. Prints the process's resident memory (RSS)
   and its peak after the first generation and at checkpoints; the peak must level off.
2. Interleaving. One shape (batch 8, 32 px): the time of a shallow step, of copying the cached feature in or out
   of the plan's slot (what a switch between generations costs, :mod:`fxcache.generations`), and of whole
   generations run one after the other against the same generations interleaved step by step (two at a time).

Writes ``<out>/generations-<time>.json``; the machine, versions and settings are in it.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

import fxcache
from benchmarks.common import log, machine, median_seconds, peak_rss_mib, rss_mib, table, write_json
from fxcache.demo import toy


def _shapes(n: int) -> list[tuple[int, int]]:
    """``n`` (batch, size) pairs: sizes 16, 24, 32... px (the demo U-Net halves 3 times), batch 1 and 2."""
    return [(1 + i % 2, 16 + 8 * (i // 2)) for i in range(n)]


def _generation(cached: torch.nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    ts = torch.linspace(999, 0, steps).round()
    for t in ts:
        x = x - 0.05 * cached(x, t).sample
    return x


def memory(unet: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    cached = fxcache.transform(unet, branch=0, interval=3, max_plans=args.max_plans)
    shapes = _shapes(args.shapes)
    checkpoints = sorted({1, args.shapes, 2 * args.shapes, args.generations // 2, args.generations})
    rows, start = [], time.perf_counter()
    first_peak = None
    with torch.no_grad():
        for g in range(1, args.generations + 1):
            batch, size = shapes[(g - 1) % len(shapes)]
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(g))
            with cached.generation():
                _generation(cached, x, args.steps)
            if g == 1:
                first_peak = peak_rss_mib()
            if g in checkpoints:
                rows.append(
                    {
                        "generation": g,
                        "rss_mib": rss_mib(),
                        "peak_rss_mib": peak_rss_mib(),
                        "plans_kept": len(cached.plans),
                        "seconds": time.perf_counter() - start,
                    }
                )
                log(f"  generation {g}: RSS {rows[-1]['rss_mib']:.0f} MiB, peak {rows[-1]['peak_rss_mib']:.0f} MiB")
    assert first_peak is not None
    last = rows[-1]
    return {
        "shapes": shapes,
        "first_generation_peak_rss_mib": first_peak,
        "checkpoints": rows,
        "growth_after_first_cycle_mib": last["peak_rss_mib"]
        - next(r for r in rows if r["generation"] >= args.shapes)["peak_rss_mib"],
    }


def interleaving(unet: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    cached = fxcache.transform(unet, branch=0, interval=3)
    xs = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    t = torch.tensor(500.0)
    with torch.no_grad():
        cached(xs[0], t)  # builds the plan; step 0 of this thread's generation: full
        cached(xs[0], torch.tensor(499.0))  # a shallow step
        entry = next(iter(cached._entries.values()))
        shallow = median_seconds(lambda: entry.graphs.shallow(*entry.plan.flatten((xs[0], t))), args.reps)
        full = median_seconds(lambda: entry.graphs.full(*entry.plan.flatten((xs[0], t))), args.reps)
        saved = entry.slot.save(None)
        copy_out = median_seconds(lambda: entry.slot.save(saved), args.reps)
        copy_in = median_seconds(lambda: entry.slot.load(saved), args.reps)

        def one_after_the_other() -> None:
            for x in xs:
                with cached.generation():
                    _generation(cached, x, args.steps)

        def interleaved() -> None:
            gens, ys = [cached.generation(), cached.generation()], list(xs)
            for step_t in torch.linspace(999, 0, args.steps).round():
                for i, g in enumerate(gens):
                    with g:
                        ys[i] = ys[i] - 0.05 * cached(ys[i], step_t).sample

        sequential_s = median_seconds(one_after_the_other, args.gen_reps)
        interleaved_s = median_seconds(interleaved, args.gen_reps)
    return {
        "shape": [8, 3, 32, 32],
        "cache_shape": list(entry.plan.cache_shape),
        "cache_mib": math.prod(entry.plan.cache_shape) * entry.plan.cache_spec.dtype.itemsize / 2**20,
        "full_step_ms": 1e3 * full,
        "shallow_step_ms": 1e3 * shallow,
        "copy_out_ms": 1e3 * copy_out,
        "copy_in_ms": 1e3 * copy_in,
        "two_generations_one_after_the_other_s": sequential_s,
        "two_generations_interleaved_s": interleaved_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generations", description=__doc__.split("\n")[0])
    p.add_argument("--generations", type=int, default=200)
    p.add_argument("--shapes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-plans", type=int, default=fxcache.CacheConfig().max_plans)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--gen-reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="20 generations, fewer repetitions")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    if args.quick:
        args.generations, args.reps, args.gen_reps = 20, 5, 2
    unet = toy.load_demo_unet()
    info = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "dtype": "float32"}
    log(f"memory: {args.generations} generations of {args.steps} steps over {args.shapes} shapes, "
        f"max_plans={args.max_plans}")  # fmt: skip
    info["memory"] = mem = memory(unet, args)
    log("interleaving: one shape, batch 8, 32 px")
    info["interleaving"] = il = interleaving(unet, args)
    log(
        table(
            ["measure", "value"],
            [
                ["peak RSS after generation 1 (MiB)", f"{mem['first_generation_peak_rss_mib']:.0f}"],
                *[
                    [f"peak RSS after generation {r['generation']} (MiB)", f"{r['peak_rss_mib']:.0f}"]
                    for r in mem["checkpoints"][1:]
                ],
                ["peak growth after the first cycle of shapes (MiB)", f"{mem['growth_after_first_cycle_mib']:.1f}"],
                ["full / shallow step (ms)", f"{il['full_step_ms']:.2f} / {il['shallow_step_ms']:.2f}"],
                [
                    f"copy of the cache {il['cache_shape']} out / in (ms)",
                    f"{il['copy_out_ms']:.3f} / {il['copy_in_ms']:.3f}",
                ],
                [
                    "2 generations, one after the other / interleaved (s)",
                    f"{il['two_generations_one_after_the_other_s']:.3f} / {il['two_generations_interleaved_s']:.3f}",
                ],
            ],
        )
    )
    path = write_json(args.out / f"generations-{time.strftime('%Y%m%d-%H%M%S')}.json", info)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
