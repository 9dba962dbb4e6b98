"""The compile benchmark's results: rows with speedups against every baseline, the targets, the text report,
and the JSON / CSV / PNG files (``python -m benchmarks.compile``)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import fmt, latent_psnr, log, machine, table, version, write_csv, write_json
from benchmarks.compile_methods import Bench
from benchmarks.compile_scenario import (
    CACHED_METHODS,
    DEFINITIONS,
    FX_COMPILED,
    FX_EAGER,
    GPU_MIN_FRACTION_OF_IDEAL,
    GPU_MIN_SPEEDUP_VS_HELPER,
    GPU_MIN_STEPS_PER_S,
    GPU_TARGET_BRANCH,
    GPU_TARGET_N,
    GPU_TARGET_SIZE,
    HELPER,
    MODELS,
    PLAIN_COMPILED,
    PLAIN_EAGER,
    Scenario,
    counts,
)


@dataclass
class Row:
    """One method at one (N, branch): per-step and end-to-end times, one-time cost, memory, quality."""

    method: str
    interval: int  # N; 1 for the plain model (every step full)
    branch: int | None
    full_steps: int  # in one generation
    shallow_steps: int
    full_step_ms: float | None
    shallow_step_ms: float | None
    f: float | None  # shallow_step_ms / full_step_ms
    generation_s: float  # median over the rounds
    generation_runs: int
    steps_per_s: float
    warmup_generation_s: float | None
    warmup_steps: int
    compile_s: float | None  # one-time cost: warm-up generation minus its steady-state cost
    peak_memory_mib: float  # during the timed generation, the whole process (every method set up so far)
    working_memory_mib: float  # that peak minus what was allocated when the generation started
    kept_memory_mib: float | None  # what setting the method up added and kept (compiled graphs, CUDA graph pools)
    psnr_db: float | None
    speedup_vs_plain_eager: float | None = None
    speedup_vs_plain_compiled: float | None = None
    speedup_vs_helper: float | None = None
    ideal_speedup: float | None = None
    fraction_of_ideal: float | None = None
    max_abs_diff_vs_helper: float | None = None  # fxcache eager only: the helper computes the same thing
    # The same ratio inside a real generation (DEFINITIONS: f_gen), and the ideal and fraction computed from it.
    full_step_gen_ms: float | None = None
    shallow_step_gen_ms: float | None = None
    f_gen: float | None = None
    ideal_speedup_gen: float | None = None
    fraction_of_ideal_gen: float | None = None


@dataclass
class Check:
    name: str
    value: float | None
    target: str
    status: str  # PASS, FAIL or SKIP (not measured)
    note: str = ""


# -- rows ----------------------------------------------------------------------------------------------


def make_rows(bench: Bench) -> list[Row]:
    """One row per method, N and branch measured so far, with speedups against every baseline."""
    sc = bench.sc
    reference = next((e.latents.get(1) for e in bench.engines if e.method == PLAIN_EAGER), None)
    rows: list[Row] = []
    for eng in bench.engines:
        full_s = statistics.median(s[0] for s in eng.steps) if eng.steps else None
        shallows = [s[1] for s in eng.steps if s[1] is not None]
        shallow_s = statistics.median(shallows) if shallows else None
        steady = None
        if full_s is not None and eng.warmup_s is not None:
            wf, ws = counts(eng.warmup_interval, eng.warmup_steps)
            steady = wf * full_s + ws * (shallow_s if shallow_s is not None else full_s)
        for n in eng.intervals:
            if n not in eng.gens:
                continue
            gen_s = statistics.median(eng.gens[n])
            n_full, n_shallow = counts(n, sc.steps, eng.kind)
            full_gen, shallow_gen = bench.step_times_in_generation(eng, n)
            rows.append(
                Row(
                    method=eng.method, interval=n, branch=eng.branch, full_steps=n_full, shallow_steps=n_shallow,
                    full_step_ms=None if full_s is None else 1e3 * full_s,
                    shallow_step_ms=None if shallow_s is None else 1e3 * shallow_s,
                    f=None if full_s is None or shallow_s is None else shallow_s / full_s,
                    generation_s=gen_s, generation_runs=len(eng.gens[n]), steps_per_s=sc.steps / gen_s,
                    warmup_generation_s=eng.warmup_s, warmup_steps=eng.warmup_steps,
                    compile_s=None if steady is None or eng.warmup_s is None else max(0.0, eng.warmup_s - steady),
                    peak_memory_mib=eng.peaks[n], working_memory_mib=eng.working[n], kept_memory_mib=eng.kept_mib,
                    psnr_db=None if reference is None else latent_psnr(reference, eng.latents[n]),
                    full_step_gen_ms=None if full_gen is None else 1e3 * full_gen,
                    shallow_step_gen_ms=None if shallow_gen is None else 1e3 * shallow_gen,
                    f_gen=None if full_gen is None or shallow_gen is None else shallow_gen / full_gen,
                )
            )  # fmt: skip
    by = {(r.method, r.interval, r.branch): r for r in rows}
    latents = {(e.method, n, e.branch): x for e in bench.engines for n, x in e.latents.items()}
    eager, comp = by.get((PLAIN_EAGER, 1, None)), by.get((PLAIN_COMPILED, 1, None))
    for r in rows:
        helper = by.get((HELPER, r.interval, r.branch)) if r.method in CACHED_METHODS else None
        r.speedup_vs_plain_eager = eager.generation_s / r.generation_s if eager else None
        r.speedup_vs_plain_compiled = comp.generation_s / r.generation_s if comp else None
        r.speedup_vs_helper = helper.generation_s / r.generation_s if helper else None
        own = comp if r.method.startswith(FX_COMPILED) else eager  # the same engine without caching
        if r.f is not None:
            r.ideal_speedup = sc.steps / (r.full_steps + r.shallow_steps * r.f)
            if own is not None:
                r.fraction_of_ideal = own.generation_s / r.generation_s / r.ideal_speedup
        if r.f_gen is not None:
            r.ideal_speedup_gen = sc.steps / (r.full_steps + r.shallow_steps * r.f_gen)
            if own is not None:
                r.fraction_of_ideal_gen = own.generation_s / r.generation_s / r.ideal_speedup_gen
        if r.method == FX_EAGER and helper is not None:
            diff = latents[(FX_EAGER, r.interval, r.branch)] - latents[(HELPER, r.interval, r.branch)]
            r.max_abs_diff_vs_helper = float(diff.abs().max())
    return rows


# -- targets ------------------------------------------------------------------------------------------


def check_targets(sc: Scenario, rows: list[Row]) -> list[Check]:
    by = {(r.method, r.interval, r.branch): r for r in rows}
    checks: list[Check] = []
    if sc.device == "cuda":
        n, b = GPU_TARGET_N, GPU_TARGET_BRANCH
        fx, comp, helper = by.get((FX_COMPILED, n, b)), by.get((PLAIN_COMPILED, 1, None)), by.get((HELPER, n, b))
        where = f"fxcache compiled, N={n}, branch {b}"
        missing = "not measured (not in the scenario, or the measurement failed)"
        if fx is not None and comp is not None and fx.f is not None:
            ideal = n / (1 + (n - 1) * fx.f)
            fraction = comp.generation_s / fx.generation_s / ideal
            checks.append(Check(f"{where}: speedup over plain compiled / ideal N/(1+(N-1)f), f = {fx.f:.3f}",
                                fraction, f">= {GPU_MIN_FRACTION_OF_IDEAL:.2f}",
                                "PASS" if fraction >= GPU_MIN_FRACTION_OF_IDEAL else "FAIL",
                                f"speedup {comp.generation_s / fx.generation_s:.2f}x, ideal {ideal:.2f}x"))  # fmt: skip
        else:
            checks.append(Check(f"{where}: speedup over plain compiled / ideal", None, ">= 0.90", "SKIP", missing))
        if fx is not None and comp is not None and fx.f_gen is not None:  # the same, f from within a generation
            ideal = fx.ideal_speedup_gen
            fraction = comp.generation_s / fx.generation_s / ideal
            checks.append(Check(f"{where}: speedup over plain compiled / ideal with f_gen (f within a generation) = "
                                f"{fx.f_gen:.3f}", fraction, f">= {GPU_MIN_FRACTION_OF_IDEAL:.2f}",
                                "PASS" if fraction >= GPU_MIN_FRACTION_OF_IDEAL else "FAIL",
                                f"speedup {comp.generation_s / fx.generation_s:.2f}x, ideal {ideal:.2f}x"))  # fmt: skip
        else:
            checks.append(Check(f"{where}: speedup over plain compiled / ideal with f_gen", None, ">= 0.90", "SKIP",
                                missing))  # fmt: skip
        if fx is not None and helper is not None:
            ratio = helper.generation_s / fx.generation_s
            checks.append(Check(f"{where}: end-to-end speedup over DeepCacheSDHelper (N={n}, branch {b})", ratio,
                                f">= {GPU_MIN_SPEEDUP_VS_HELPER:.1f}",
                                "PASS" if ratio >= GPU_MIN_SPEEDUP_VS_HELPER else "FAIL"))  # fmt: skip
        else:
            checks.append(Check(f"{where}: speedup over DeepCacheSDHelper", None, ">= 2.0", "SKIP", missing))
        if fx is not None:
            note = "" if sc.size == GPU_TARGET_SIZE else f"target set for {GPU_TARGET_SIZE} px"
            checks.append(Check(f"{where}: effective U-Net steps/s (steps / generation_s)", fx.steps_per_s,
                                f">= {GPU_MIN_STEPS_PER_S:.0f}",
                                "PASS" if fx.steps_per_s >= GPU_MIN_STEPS_PER_S else "FAIL", note))  # fmt: skip
        else:
            checks.append(Check(f"{where}: effective steps/s", None, ">= 300", "SKIP", missing))
        return checks
    for n in sc.intervals:
        for b in sc.branches:
            fx = by.get((FX_COMPILED, n, b))
            for other in (FX_EAGER, HELPER):
                o = by.get((other, n, b))
                name = f"N={n}, branch {b}: fxcache compiled time / {other} time"
                if fx is None or o is None:
                    checks.append(Check(name, None, "< 1.00", "SKIP", "not measured"))
                else:
                    ratio = fx.generation_s / o.generation_s
                    checks.append(Check(name, ratio, "< 1.00", "PASS" if ratio < 1.0 else "FAIL"))
    return checks


# -- describing and writing -------------------------------------------------------------------------


def environment(sc: Scenario, bench: Bench | None = None) -> dict[str, Any]:
    env = machine()  # host CPU, torch, diffusers, DeepCache, fxcache, load average
    env["device"] = sc.device
    env["triton"] = version("triton", "pytorch-triton")
    if sc.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            device_name=props.name,
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            peak_memory="peak = torch.cuda.max_memory_allocated during the timed generation (reset before it); "
            "work = peak - memory_allocated at its start; kept = memory_allocated after the method's setup - before",
        )
    else:
        resets = bench.peak_resets if bench is not None else True
        peak = "peak = process peak RSS (VmHWM) during the timed generation, " + (
            "reset before it" if resets else "not reset (/proc/self/clear_refs is not writable): the peak so far"
        )
        peak += "; work = peak - RSS at its start; kept = RSS after the method's setup - before"
        env.update(device_name=env["cpu"], cuda=None, peak_memory=peak)
    return env


def run_info(sc: Scenario, env: dict[str, Any]) -> dict[str, Any]:
    """What every results file repeats: device, versions, dtype, shapes, steps."""
    return {
        "run": sc.name, "device": sc.device, "device_name": env["device_name"], "torch": env["torch"],
        "triton": env["triton"], "cuda": env["cuda"], "diffusers": env["diffusers"], "DeepCache": env["DeepCache"],
        "fxcache": env["fxcache"], "model": MODELS[sc.model], "dtype": sc.dtype, "size_px": sc.size,
        "sample_shape": "x".join(map(str, sc.sample_shape)), "text_shape": "x".join(map(str, sc.text_shape)),
        "steps": sc.steps, "scheduler": "DDIM", "cfg": "batch 1 + classifier-free guidance",
        "compile_mode": sc.compile_label,
    }  # fmt: skip


_COLUMNS = ["method", "N", "br", "full ms", "shallow ms", "f", "full+shal", "gen s", "steps/s", "vs eager",
            "vs compiled", "vs helper", "ideal", "% ideal", "f gen", "ideal gen", "% ideal gen", "one-time s",
            "peak MiB", "work MiB", "kept MiB", "PSNR dB"]  # fmt: skip


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _cells(r: Row) -> list[str]:
    return [
        r.method, str(r.interval), "" if r.branch is None else str(r.branch), fmt(r.full_step_ms, ".1f"),
        fmt(r.shallow_step_ms, ".1f"), fmt(r.f, ".3f"), f"{r.full_steps}+{r.shallow_steps}",
        fmt(r.generation_s, ".3f"), fmt(r.steps_per_s, ".1f"), _x(r.speedup_vs_plain_eager),
        _x(r.speedup_vs_plain_compiled), _x(r.speedup_vs_helper), _x(r.ideal_speedup),
        "" if r.fraction_of_ideal is None else f"{100 * r.fraction_of_ideal:.0f}%", fmt(r.f_gen, ".3f"),
        _x(r.ideal_speedup_gen), "" if r.fraction_of_ideal_gen is None else f"{100 * r.fraction_of_ideal_gen:.0f}%",
        fmt(r.compile_s, ".1f"),
        fmt(r.peak_memory_mib, ".0f"), fmt(r.working_memory_mib, ".0f"), fmt(r.kept_memory_mib, ".0f"),
        fmt(r.psnr_db, ".1f"),
    ]  # fmt: skip


def report(sc: Scenario, env: dict[str, Any], bench: Bench, rows: list[Row], checks: list[Check],
           total_s: float) -> str:  # fmt: skip
    dev = env["device_name"] + (f" (CUDA {env['cuda']}, {env['gpu_memory_gib']} GiB)" if sc.device == "cuda" else
                                f", {env['cores']} cores, {env['torch_threads']} torch threads")  # fmt: skip
    out = [
        f"run {sc.name}",
        f"device: {sc.device}: {dev}; host {env['cpu']}; load average at start {env['load_average_1min_at_start']:.2f}",
        f"software: torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}, DeepCache "
        f"{env['DeepCache']}, fxcache {env['fxcache']}, Python {env['python']}",
        f"model: {MODELS[sc.model]}; {bench.params / 1e6:.1f}M parameters",
        f"scenario: {sc.dtype}, {sc.size} px, sample {'x'.join(map(str, sc.sample_shape))} (batch 1 + CFG), text "
        f"{'x'.join(map(str, sc.text_shape))}; {sc.steps} DDIM steps; N in {list(sc.intervals)}, branch in "
        f"{list(sc.branches)}; torch.compile {sc.compile_label!r} (fullgraph, static shapes) for both compiled methods",
        f"timing: per method (and branch) 1 warm-up generation, then {sc.gen_reps} rounds (round 1 right after the "
        "setup, the others interleaved across methods) of 1 generation per N and 1 step-time measurement (mean of "
        f"{sc.step_reps} calls); medians reported",
        f"peak memory: {env['peak_memory']}",
        "",
        table(_COLUMNS, [_cells(r) for r in rows]),
        "",
        "gen s: one pipeline call (median), latents out, between device syncs; steps/s = steps / gen s (effective: a "
        "shallow step counts as a step);",
        "vs X: X's gen s / this gen s (helper: same N and branch); f = shallow ms / full ms from back-to-back U-Net "
        "calls; ideal = steps / (full + shallow * f) = N/(1+(N-1)f) when N divides the steps;",
        "f gen: the same ratio from step times inside real generations (a synced callback after each step); "
        "ideal gen and % ideal gen use it in place of f;",
        "% ideal: speedup over the same engine uncached (plain compiled for fxcache compiled, plain eager otherwise) "
        "/ ideal; one-time s: warm-up generation minus its steady-state cost",
        "(capture, compile, CUDA-graph recording; fxcache: once per branch, shared by all N); PSNR: latents against "
        "plain eager's;",
        "peak MiB is the whole process's, every method set up so far included (all are kept for the interleaved "
        "rounds); work and kept MiB are the method's own.",
    ]
    diffs = [r for r in rows if r.max_abs_diff_vs_helper is not None]
    if diffs:
        out.append("fxcache eager vs DeepCacheSDHelper, max |latent difference|: " + ", ".join(
            f"N={r.interval} b{r.branch}: {r.max_abs_diff_vs_helper:.3g}" for r in diffs))  # fmt: skip
    out += ["", f"Targets ({sc.device})"]
    for c in checks:
        value = "not measured" if c.value is None else fmt(c.value, ".3g")
        out.append(f"  {c.status}  {c.name} = {value} (target {c.target})" + (f"; {c.note}" if c.note else ""))
    for note in bench.notes:
        out.append(f"note: {note}")
    for err in bench.errors:
        out.append(f"ERROR: {err}")
    out.append(f"total {total_s:.0f} s")
    return "\n".join(out)


def write_files(out_dir: Path, sc: Scenario, env: dict[str, Any], bench: Bench, rows: list[Row], checks: list[Check],
                total_s: float, chart: bool = True) -> list[Path]:  # fmt: skip
    """JSON, CSV and (with ``chart``) PNG; called after every method with ``chart=False``, so a run cut short
    still leaves what it measured."""
    info = run_info(sc, env)
    result = {
        **info,
        "scenario": asdict(sc),
        "shapes": {"sample": sc.sample_shape, "text": sc.text_shape, "latent_px": sc.latent},
        "parameters": bench.params,
        "machine": env,
        "definitions": DEFINITIONS,
        "rows": [asdict(r) for r in rows],
        "checks": [asdict(c) for c in checks],
        "notes": bench.notes,
        "errors": bench.errors,
        "total_seconds": total_s,
        "complete": chart,
    }
    json_path = write_json(out_dir / f"{sc.name}.json", result)
    csv_path = write_csv(  # one row per measurement, the run's context on every row
        out_dir / f"{sc.name}.csv", [*info, *(f.name for f in fields(Row))], ({**info, **asdict(r)} for r in rows)
    )
    paths = [json_path, csv_path]
    png = None if not chart else draw_chart(out_dir / f"{sc.name}.png", sc, env, rows)
    if png is not None:
        paths.append(png)
    return paths


def draw_chart(path: Path, sc: Scenario, env: dict[str, Any], rows: list[Row]) -> Path | None:
    """Speedup over plain eager against N, one line per method and one panel per branch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed, so no PNG chart was drawn (pip install matplotlib); "
             "the JSON and CSV files are complete")  # fmt: skip
        return None
    by = {(r.method, r.interval, r.branch): r for r in rows}
    eager, comp = by.get((PLAIN_EAGER, 1, None)), by.get((PLAIN_COMPILED, 1, None))
    branches = [b for b in sc.branches if any(r.branch == b for r in rows)] or [None]
    fig, axes = plt.subplots(1, len(branches), figsize=(6 * len(branches), 4.6), squeeze=False, sharey=True)
    styles = {HELPER: ("tab:orange", "s", "-"), FX_EAGER: ("tab:blue", "o", "-"), FX_COMPILED: ("tab:green", "D", "-")}
    dashes = {"nonuniform": "--", "eq7": "-."}
    for kind in (k for k in sc.schedules if k != "uniform"):
        for method in (FX_EAGER, FX_COMPILED):
            styles[f"{method} {kind}"] = (*styles[method][:2], dashes.get(kind, ":"))
    for ax, b in zip(axes[0], branches, strict=True):
        ax.axhline(1.0, color="gray", lw=1, ls="-", label=f"{PLAIN_EAGER} (1.00x)")
        if comp is not None and comp.speedup_vs_plain_eager is not None:
            ax.axhline(comp.speedup_vs_plain_eager, color="tab:red", lw=1, ls="--",
                       label=f"{PLAIN_COMPILED} ({comp.speedup_vs_plain_eager:.2f}x)")  # fmt: skip
        for method, (color, marker, line) in styles.items():
            pts = [(n, by[(method, n, b)]) for n in sc.intervals if (method, n, b) in by]
            if not pts or pts[0][1].speedup_vs_plain_eager is None:
                continue
            # N = 1 is the same engine without caching: plain compiled for fxcache compiled, plain eager otherwise.
            start = comp.speedup_vs_plain_eager if method.startswith(FX_COMPILED) and comp is not None else 1.0
            xs, ys = [1, *(n for n, _ in pts)], [start, *(r.speedup_vs_plain_eager for _, r in pts)]
            ax.plot(xs, ys, color=color, marker=marker, ls=line, label=method)
            if method == FX_COMPILED and comp is not None and eager is not None:
                ideal = [start * r.ideal_speedup for _, r in pts if r.ideal_speedup is not None]
                ax.plot(xs[1:], ideal, color=color, ls=":", lw=1, label="fxcache compiled, ideal at measured f")
        ax.set_title(f"branch {b}")
        ax.set_xlabel("cache interval N (1 = no caching)")
        ax.set_xticks([1, *sc.intervals])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("end-to-end speedup over plain eager")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"{sc.name}\n{env['device_name']} ({sc.device}), torch {env['torch']}, triton {env['triton']}\n"
        f"{sc.dtype}, sample {'x'.join(map(str, sc.sample_shape))} ({sc.size} px, CFG), {sc.steps} DDIM steps, "
        f"compile {sc.compile_label}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
