"""Core benchmark: what a shallow step costs, and what DeepCache buys in a whole generation.

    python -m benchmarks.core [--size 256] [--steps 10] [--interval 5] [--out benchmarks/out]
    python -m benchmarks.core --size 64 --steps 4      # smoke run, a couple of minutes

(from the repository root; ``make bench`` runs the first line).

Model: the Stable Diffusion 1.5 U-Net architecture with random weights (nothing can be downloaded),
fp32 on CPU, batch 2 (classifier-free guidance), latents of size/8. Three measurements:

1. One step. The plain U-Net called eagerly, fxcache's full graph, and for every branch the shallow
   graph (capture once, split per branch; median of --reps runs after one warm-up), next to the
   branch's share of FLOPs from ``fxcache.explain``.
2. One generation of --steps DDIM steps at interval N, branch 0: the plain pipeline,
   ``fxcache.enable`` and DeepCache's reference ``DeepCacheSDHelper``, each warmed up once. fxcache's
   one-time capture is reported on its own. Quality: PSNR against the plain run, and fxcache's latents
   compared bit for bit with the helper's.
3. Targets, printed PASS/FAIL: branch 0's shallow/full time <= 0.10; fxcache's speedup >= 90% of the
   ideal N / (1 + (N - 1) f), f being branch 0's measured shallow/full time; fxcache no slower than
   the helper; fxcache bit-identical to the helper. The time targets are meant for 256 px: at 64 px
   per-op overheads dominate and a FAIL there says little.

A run is data: a :class:`Scenario` in, :class:`Row` s out, printed as tables and written to
``<out>/<run name>.json`` and ``.csv``, each naming the machine, library versions, dtype, shapes and steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch

import fxcache
from benchmarks.common import fmt, latent_psnr, log, machine, median_seconds, peak_rss_mib, table, write_csv, write_json
from fxcache.adapters.diffusers import branch_from_deepcache_id
from fxcache.capture import capture, flatten_call
from fxcache.demo.sd15 import LATENT_FACTOR, quiet_hf_logs, random_prompt_embeds, sd15_unet, sd_pipeline
from fxcache.passes import bind_cache_buffer, extract_subgraph, find_skip_merges, split_at_branch

# The targets (see the module docstring).
MAX_SHALLOW_RATIO = 0.10  # branch 0's shallow step / full step, in time
MIN_FRACTION_OF_IDEAL = 0.90  # generation speedup / ideal speedup


@dataclass(frozen=True)
class Scenario:
    """What one benchmark run measures."""

    size: int = 256  # pixels; the latents are size / 8
    steps: int = 10  # DDIM steps per generation
    interval: int = 5  # N: one full step every N steps
    branch: int = 0  # branch cached in the generation runs
    batch: int = 2  # classifier-free guidance: negative + positive prompt
    reps: int = 3  # timed repetitions per step measurement (median reported)
    gen_reps: int = 1  # timed generations per engine (median reported)
    seed: int = 0
    dtype: str = "float32"

    @property
    def latent(self) -> int:
        return self.size // LATENT_FACTOR

    @property
    def name(self) -> str:
        return f"core_sd15_{self.size}px_b{self.batch}_{self.dtype}_{self.steps}steps_N{self.interval}_b{self.branch}"


@dataclass
class Row:
    """One measurement. Step rows fill the first group of fields, generation rows the second."""

    section: str  # "step" or "generation"
    name: str
    seconds: float  # median steady-state time
    peak_rss_mib: float  # the process's peak resident memory so far
    # step rows
    branch: int | None = None
    cache_shape: str = ""
    flops_fraction: float | None = None  # shallow FLOPs / full FLOPs (fxcache.explain)
    time_ratio: float | None = None  # shallow time / fxcache full-graph time
    # generation rows
    warmup_seconds: float | None = None  # the warm-up generation (fxcache: includes the capture)
    full_steps: int | None = None
    shallow_steps: int | None = None
    speedup_vs_plain: float | None = None
    speedup_vs_helper: float | None = None
    psnr_db: float | None = None  # latents against the plain pipeline's
    max_abs_diff_vs_helper: float | None = None
    identical_to_helper: bool | None = None


@dataclass
class Check:
    name: str
    value: float
    target: str
    passed: bool


# -- measuring -------------------------------------------------------------------------------------


def measure_steps(unet: torch.nn.Module, sc: Scenario, prompt: torch.Tensor) -> tuple[list[Row], float]:
    """Rows for one eager step, fxcache's full graph and every branch's shallow graph; and the capture time."""
    g = torch.Generator().manual_seed(sc.seed)
    sample = torch.randn(sc.batch, unet.config.in_channels, sc.latent, sc.latent, generator=g)
    args, kwargs = (sample, torch.tensor(999)), {"encoder_hidden_states": prompt}
    rows: list[Row] = []

    log("step: plain U-Net, eager")
    eager_s = median_seconds(lambda: unet(*args, **kwargs), sc.reps)
    rows.append(Row("step", "unet eager (full)", eager_s, peak_rss_mib()))

    log("step: capture + find skips + split (one-time cost of fxcache)")
    start = time.perf_counter()
    captured = capture(unet, args, kwargs)
    merges = find_skip_merges(captured.gm)
    if sc.branch >= len(merges):
        raise SystemExit(f"--branch {sc.branch} is out of range: this U-Net has {len(merges)} branches "
                         f"(0..{len(merges) - 1})")  # fmt: skip
    split_at_branch(captured.gm, merges[sc.branch])
    capture_s = time.perf_counter() - start
    branches = fxcache.explain(unet, *args, **kwargs)  # FLOPs per branch; captures again (not timed)
    assert len(branches) == len(merges), "explain and find_skip_merges disagree on the number of branches"

    leaves, _ = flatten_call(unet, args, kwargs)
    # Every branch's cache content from one run, rather than one full step per branch.
    deeps = extract_subgraph(captured.gm, {}, [m.deep for m in merges])(*leaves)
    full_s = math.nan
    for i, (merge, deep) in enumerate(zip(merges, deeps, strict=True)):
        # The graphs CachedModule runs: the full one writes the deep feature into `cache`, the
        # shallow one reads it from there.
        cache = deep.clone()
        full, shallow = bind_cache_buffer(*split_at_branch(captured.gm, merge), cache)
        if i == 0:  # the full graph costs about the same for every branch (one more copy)
            log("step: fxcache full graph")
            full_s = median_seconds(partial(full, *leaves), sc.reps)
            rows.append(Row("step", "fxcache full graph", full_s, peak_rss_mib(), time_ratio=1.0))
        log(f"step: fxcache shallow graph, branch {i}")
        shallow_s = median_seconds(partial(shallow, *leaves), sc.reps)
        b = branches[i]
        rows.append(
            Row(
                "step", f"fxcache shallow graph, branch {i}", shallow_s, peak_rss_mib(), branch=i,
                cache_shape="x".join(map(str, b.cache_shape)), flops_fraction=b.flops_fraction,
                time_ratio=shallow_s / full_s,
            )
        )  # fmt: skip
        del full, shallow, cache
    return rows, capture_s


def measure_generation(unet: torch.nn.Module, sc: Scenario) -> list[Row]:
    """Rows for one generation: plain pipeline, fxcache.enable, DeepCacheSDHelper."""
    from DeepCache import DeepCacheSDHelper

    pipe = sd_pipeline(unet)
    emb, neg = random_prompt_embeds(sc.seed)
    warmup_steps = min(2, sc.steps)  # one full and one shallow step: every kernel, and the capture

    def generate(steps: int) -> torch.Tensor:
        return pipe(
            prompt_embeds=emb, negative_prompt_embeds=neg, height=sc.latent, width=sc.latent,
            num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(sc.seed),
        ).images  # fmt: skip

    def run(label: str) -> tuple[torch.Tensor, float, float]:
        log(f"generation: {label}, warm-up ({warmup_steps} steps)")
        start = time.perf_counter()
        generate(warmup_steps)
        warmup_s = time.perf_counter() - start
        times, latents = [], None
        for r in range(sc.gen_reps):
            log(f"generation: {label}, timed run {r + 1}/{sc.gen_reps} ({sc.steps} steps)")
            start = time.perf_counter()
            latents = generate(sc.steps)
            times.append(time.perf_counter() - start)
        return latents, statistics.median(times), warmup_s

    plain, plain_s, plain_warm = run("plain pipeline")

    fxcache.enable(pipe, branch=sc.branch, interval=sc.interval)
    try:
        state = pipe.unet.fxcache_state
        full0 = state.full_steps  # the counters are cumulative
        ours, ours_s, ours_warm = run(f"fxcache.enable(branch={sc.branch}, interval={sc.interval})")
        # Steps of one timed generation, from the schedule; the counters (warm-up included) must agree.
        schedule = fxcache.uniform(sc.interval)
        n_full = sum(schedule.is_full(i) for i in range(sc.steps))
        n_shallow = sc.steps - n_full
        expected = n_full * sc.gen_reps + sum(schedule.is_full(i) for i in range(warmup_steps))
        counted = state.full_steps - full0
        assert counted == expected, f"fxcache ran {counted} full steps, expected {expected}"
    finally:
        fxcache.disable(pipe)

    # DeepCache ids are block * 3 + layer; on SD1.5 (two layers per block) they equal fxcache's branches.
    assert branch_from_deepcache_id(unet, sc.branch) == sc.branch
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=sc.interval, cache_branch_id=sc.branch)
    helper.enable()
    try:
        ref, ref_s, ref_warm = run(f"DeepCacheSDHelper(cache_interval={sc.interval}, cache_branch_id={sc.branch})")
    finally:
        helper.disable()

    rss = peak_rss_mib()
    diff = float((ours - ref).abs().max())
    return [
        Row("generation", "plain pipeline", plain_s, rss, warmup_seconds=plain_warm,
            full_steps=sc.steps, shallow_steps=0, speedup_vs_plain=1.0, speedup_vs_helper=ref_s / plain_s,
            psnr_db=None),  # the reference
        Row("generation", "fxcache.enable", ours_s, rss, warmup_seconds=ours_warm,
            full_steps=n_full, shallow_steps=n_shallow, speedup_vs_plain=plain_s / ours_s,
            speedup_vs_helper=ref_s / ours_s, psnr_db=latent_psnr(plain, ours), max_abs_diff_vs_helper=diff,
            identical_to_helper=torch.equal(ours, ref)),
        Row("generation", "DeepCacheSDHelper", ref_s, rss, warmup_seconds=ref_warm,
            full_steps=n_full, shallow_steps=n_shallow, speedup_vs_plain=plain_s / ref_s,
            speedup_vs_helper=1.0, psnr_db=latent_psnr(plain, ref), max_abs_diff_vs_helper=0.0,
            identical_to_helper=True),
    ]  # fmt: skip


def check_targets(rows: list[Row], sc: Scenario) -> tuple[list[Check], dict[str, float]]:
    """The PASS/FAIL targets, and the ideal speedups they use."""
    step = {r.name: r for r in rows if r.section == "step"}
    gen = {r.name: r for r in rows if r.section == "generation"}
    f0 = step["fxcache shallow graph, branch 0"].time_ratio
    f = step[f"fxcache shallow graph, branch {sc.branch}"].time_ratio
    ours, ref = gen["fxcache.enable"], gen["DeepCacheSDHelper"]
    n = sc.interval
    ideal = {
        "shallow_time_ratio": f,
        "ideal_speedup": n / (1 + (n - 1) * f),  # the paper's formula, for steps a multiple of N
        # The same for this run's exact step counts (equal to the above when N divides --steps).
        "ideal_speedup_this_schedule": sc.steps / (ours.full_steps + ours.shallow_steps * f),
    }
    fraction = ours.speedup_vs_plain / ideal["ideal_speedup_this_schedule"]
    ideal["fraction_of_ideal"] = fraction
    checks = [
        Check("branch-0 shallow/full time", f0, f"<= {MAX_SHALLOW_RATIO:.2f}", f0 <= MAX_SHALLOW_RATIO),
        Check("fxcache speedup / ideal", fraction, f">= {MIN_FRACTION_OF_IDEAL}", fraction >= MIN_FRACTION_OF_IDEAL),
        Check("fxcache time / helper time", ours.seconds / ref.seconds, "<= 1.00", ours.seconds <= ref.seconds),
        Check("fxcache vs helper max |diff|", ours.max_abs_diff_vs_helper, "== 0 (bit-identical)",
              bool(ours.identical_to_helper)),
    ]  # fmt: skip
    return checks, ideal


# -- describing and writing -------------------------------------------------------------------------


_GENERATION_COLUMNS = ["engine", "time (s)", "warm-up (s)", "full+shallow", "vs plain", "vs helper", "PSNR (dB)",
                       "max|diff| vs helper", "bit-identical"]  # fmt: skip


def _generation_cells(r: Row) -> list[str]:
    return [
        r.name, fmt(r.seconds, ".2f"), fmt(r.warmup_seconds, ".2f"), f"{r.full_steps}+{r.shallow_steps}",
        fmt(r.speedup_vs_plain, ".2f") + "x", fmt(r.speedup_vs_helper, ".2f") + "x", fmt(r.psnr_db, ".1f"),
        fmt(r.max_abs_diff_vs_helper, ".3g"), fmt(r.identical_to_helper),
    ]  # fmt: skip


def report(sc: Scenario, env: dict[str, Any], capture_s: float, rows: list[Row], checks: list[Check],
           ideal: dict[str, float]) -> str:  # fmt: skip
    steps = [r for r in rows if r.section == "step"]
    gens = [r for r in rows if r.section == "generation"]
    out = [
        f"run {sc.name}",
        f"machine: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}, {env['platform']}, "
        f"load average at start {env['load_average_1min_at_start']:.2f}",
        f"software: torch {env['torch']}, diffusers {env['diffusers']}, DeepCache {env['DeepCache']}, "
        f"fxcache {env['fxcache']}",
        f"model: SD1.5 U-Net architecture, random weights, {sc.dtype}, cpu; sample {sc.batch}x4x{sc.latent}x"
        f"{sc.latent} ({sc.size} px), text {sc.batch}x77x768; {sc.steps} DDIM steps, N={sc.interval}, "
        f"branch {sc.branch}",
        "",
        f"One step (median of {sc.reps} after a warm-up); fxcache capture + split: {capture_s:.1f} s, once",
        table(
            ["step", "cache", "FLOPs/full", "time (s)", "time/full"],
            [[r.name, r.cache_shape, fmt(r.flops_fraction), fmt(r.seconds), fmt(r.time_ratio)] for r in steps],
        ),
        "",
        f"One generation ({sc.steps} steps; time: median of {sc.gen_reps} after a 2-step warm-up)",
        table(_GENERATION_COLUMNS, [_generation_cells(r) for r in gens]),
        f"ideal speedup N/(1+(N-1)f) = {ideal['ideal_speedup']:.2f}x with f = {ideal['shallow_time_ratio']:.3f} "
        f"(measured shallow/full time, branch {sc.branch}); for this run's "
        f"{gens[1].full_steps}+{gens[1].shallow_steps} steps {ideal['ideal_speedup_this_schedule']:.2f}x; "
        f"achieved {100 * ideal['fraction_of_ideal']:.0f}% of it",
        f"peak RSS {max(r.peak_rss_mib for r in rows):.0f} MiB",
        "",
        "Targets",
        *(f"  {'PASS' if c.passed else 'FAIL'}  {c.name} = {fmt(c.value, '.3g')} (target {c.target})" for c in checks),
    ]
    if sc.size < 256:
        out.append(f"  (the time targets are set for 256 px; at {sc.size} px fixed per-op costs weigh more)")
    return "\n".join(out)


def write(out_dir: Path, sc: Scenario, env: dict[str, Any], capture_s: float, rows: list[Row], checks: list[Check],
          ideal: dict[str, float]) -> tuple[Path, Path]:  # fmt: skip
    run_info = {
        "run": sc.name, **{f"scenario_{k}": v for k, v in asdict(sc).items()}, "latent": sc.latent,
        "sample_shape": f"{sc.batch}x4x{sc.latent}x{sc.latent}", "text_shape": f"{sc.batch}x77x768", **env,
    }  # fmt: skip
    result = {
        "run": sc.name,
        "scenario": asdict(sc),
        "shapes": {"sample": [sc.batch, 4, sc.latent, sc.latent], "text": [sc.batch, 77, 768]},
        "machine": env,
        "capture_seconds": capture_s,
        **ideal,
        "rows": [asdict(r) for r in rows],
        "checks": [asdict(c) for c in checks],
    }
    json_path = write_json(out_dir / f"{sc.name}.json", result)
    csv_path = write_csv(  # one row per measurement, the run's context on every row
        out_dir / f"{sc.name}.csv",
        [*run_info, "capture_seconds", *(f.name for f in fields(Row))],
        ({**run_info, "capture_seconds": capture_s, **asdict(r)} for r in rows),
    )
    return json_path, csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="pixels; multiple of 64 (default 256: 32x32 latents)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per generation (default 10)")
    parser.add_argument("--interval", type=int, default=5, help="N: one full step every N (default 5)")
    parser.add_argument("--branch", type=int, default=0, help="branch cached in the generations (default 0)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per step measurement (default 3)")
    parser.add_argument("--gen-reps", type=int, default=1, help="timed generations per engine (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for JSON and CSV")
    a = parser.parse_args(argv)
    if a.size < 64 or a.size % 64:
        parser.error(f"--size {a.size}: use a multiple of 64 (the latents, size/8, must be a multiple of 8)")
    if min(a.steps, a.interval, a.reps, a.gen_reps) < 1:
        parser.error("--steps, --interval, --reps and --gen-reps must be >= 1")
    sc = Scenario(size=a.size, steps=a.steps, interval=a.interval, branch=a.branch, reps=a.reps,
                  gen_reps=a.gen_reps, seed=a.seed)  # fmt: skip

    quiet_hf_logs()
    env = machine()
    log(f"{sc.name} on {env['cpu']} ({env['cores']} cores, {env['torch_threads']} torch threads)")
    if env["load_average_1min_at_start"] > 0.5:
        # torch's OpenMP threads wait for each other: one busy core can slow every op several times over.
        log(f"warning: load average {env['load_average_1min_at_start']:.2f}: other processes are using the CPU, "
             "so these timings will be noisy")  # fmt: skip
    log("building the SD1.5 U-Net architecture with random weights")
    unet = sd15_unet(sc.seed)
    emb, neg = random_prompt_embeds(sc.seed)
    start = time.perf_counter()
    with torch.no_grad():
        step_rows, capture_s = measure_steps(unet, sc, torch.cat([neg, emb]))
    rows = step_rows + measure_generation(unet, sc)
    checks, ideal = check_targets(rows, sc)
    log(f"measured in {time.perf_counter() - start:.0f} s\n")
    print(report(sc, env, capture_s, rows, checks, ideal))
    json_path, csv_path = write(a.out, sc, env, capture_s, rows, checks, ideal)
    print(f"\nwrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
