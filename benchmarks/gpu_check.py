"""The GPU check's benchmark (issue 10): fxcache compiled under CUDA graphs against plain and the reference.

    python -m benchmarks.gpu_check --preflight                    # imports, C compiler, Python.h, device; exit 3 if not
    python -m benchmarks.gpu_check --out DIR [--scenario gpu|cpu] [--deadline-s S]

Run by ``bash benchmarks/gpu_check.sh OUTDIR`` on the GPU machine, and on CPU by ``benchmarks/gpu_dryrun.sh``
with the small ``cpu`` scenario, so a broken import or budget shows here first.

One process, one pipeline, the same embeddings and initial noise for every method, in this order (the expensive
and important first; each stage is skipped, with the reason recorded, when its estimated cost would pass the
deadline): plain eager (the PSNR reference; records the U-Net call the pipeline makes), DeepCacheSDHelper at each
N, fxcache compiled at each N (one CachedModule: only the schedule changes), plain compiled (same torch.compile
mode; ``cudagraph_mark_step_begin`` before each call, as fxcache does), fxcache eager at each N (exactness against
the helper). After every stage ``<out>/gpu_check.json`` is rewritten, so a run cut at its deadline keeps what it
measured.

Figures (definitions in ``DEFINITIONS``, written into the JSON): generation time (median of ``reps``), effective
U-Net it/s, the shallow/full ratio f twice (back-to-back calls; and inside a real generation, from per-step
timestamps), % of the ideal N / (1 + (N - 1) f) over plain compiled with each f, speed-up over the helper, host
time per call against GPU time per call, CUDA-graph skips and recompiles (Dynamo/Inductor counters), PSNR of the
latents against plain eager's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import call_seconds, latent_psnr, machine, sync, version, write_json
from benchmarks.compile_methods import MarkStep
from benchmarks.gpu_report import counters_diff as _diff
from benchmarks.gpu_report import counters_now as _counters
from benchmarks.gpu_report import report

FX_COMPILED = "fxcache compiled"  # compile=True: on CUDA, Inductor's CUDA graph trees (reduce-overhead)
FX_OWN = "fxcache compiled (own graphs)"  # compile={"cudagraphs": True}: fxcache's own CUDA graphs
TARGET_N = 5
TARGETS = {"fraction_of_ideal": 0.90, "speedup_vs_helper": 2.0, "steps_per_s": 300.0}  # issue 10, N=5, branch 0

DEFINITIONS = {
    "gen_s": "median wall time of one pipeline call (embeddings in, latents out), between two device syncs",
    "steps_per_s": "effective U-Net it/s: steps / gen_s (a shallow step counts as a step)",
    "f_b2b": "shallow / full time of the same engine from back-to-back U-Net calls (K calls between two syncs)",
    "f_gen": "shallow / full time inside a real generation: median per-step durations from synced timestamps taken "
    "in callback_on_step_end (scheduler and CFG work included; the syncs add the same cost to every step)",
    "ideal": "N / (1 + (N - 1) f) with the f named; fraction_of_ideal = (plain compiled gen_s / this gen_s) / ideal",
    "host_us, gpu_us": "one call with the GPU kept busy by a sleep kernel queued first: host_us is the wall time of "
    "the call (Python, Dynamo guards, CUDA-graph checks, launch), gpu_us the CUDA-event time of its kernels alone",
    "psnr_db": "latents against plain eager's, peak = that reference's range (inf = identical)",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str  # "sd15": SD1.5's U-Net architecture; "tiny": a small SD-style U-Net
    dtype: str
    latent: int  # latent side; pixels = 8 x latent for SD's VAE
    steps: int
    intervals: tuple[int, ...]
    branch: int
    reps: int
    compile_min_s: float  # do not start a compiled method with less time than this left


SCENARIOS = {
    "gpu": Scenario("gpu", "sd15", "float16", 64, 50, (3, 5), 0, 3, 90.0),
    "cpu": Scenario("cpu", "tiny", "float32", 16, 10, (3, 5), 0, 1, 20.0),
}
TINY_UNET = dict(  # small enough that Inductor compiles it in seconds
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TEXT = {"sd15": (77, 768), "tiny": (7, 32)}


def preflight(device: str) -> list[str]:
    """What is missing for the check to run: imports, a C compiler and Python.h (Triton/Inductor build with them)."""
    missing = []
    for mod in ("numpy", "diffusers", "DeepCache", "fxcache", "pytest") + (("triton",) if device == "cuda" else ()):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # an import error inside the package counts too
            missing.append(f"import {mod}: {type(exc).__name__}: {exc}")
    if not any(shutil.which(c) for c in (os.environ.get("CC", "cc"), "gcc", "clang")):
        missing.append("no C compiler (cc, gcc or clang) on PATH: Triton's launcher and Inductor's C++ need one")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():
        missing.append(f"{header} not found: Triton/Inductor compile against Python's headers")
    if device == "cuda" and not torch.cuda.is_available():
        missing.append("torch.cuda.is_available() is False")
    return missing


def environment() -> dict[str, Any]:
    env = {**machine(), "triton": version("triton"), "numpy": version("numpy")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())  # fmt: skip
    return env


class Check:
    def __init__(self, sc: Scenario, device: str, out: Path, deadline: float) -> None:
        self.sc, self.device, self.out, self.deadline = sc, torch.device(device), out, deadline
        self.cuda = self.device.type == "cuda"
        self.results: dict[str, Any] = {
            "scenario": asdict(sc),
            "env": environment(),
            "definitions": DEFINITIONS,
            "methods": {},
            "skipped": {},
            "errors": {},
            "log": [],
        }
        self.dtype = getattr(torch, sc.dtype)
        self.ref: torch.Tensor | None = None
        self.latents: dict[str, torch.Tensor] = {}

    # -- plumbing ----------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - T0:6.1f} s] {msg}"
        print(line, flush=True)
        self.results["log"].append(line)

    def save(self) -> None:
        write_json(self.out / "gpu_check.json", self.results)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        sync(self.device)

    def stage(self, name: str, fn: Callable[[], Any], min_s: float = 0.0) -> Any:
        if self.left() < min_s:
            self.results["skipped"][name] = f"{self.left():.0f} s left, needs about {min_s:.0f} s"
            self.log(f"{name}: SKIPPED ({self.results['skipped'][name]})")
            self.save()
            return None
        self.log(f"{name}: start ({self.left():.0f} s left)")
        try:
            return fn()
        except Exception as exc:
            traceback.print_exc()
            self.results["errors"][name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            self.log(f"{name}: FAILED ({self.results['errors'][name]})")
            return None
        finally:
            self.save()

    # -- the model and the pipeline ----------------------------------------------------------------------------
    def build(self) -> None:
        from diffusers import DDIMScheduler, UNet2DConditionModel

        from fxcache.demo.sd15 import SD15_UNET_CONFIG, sd_pipeline

        config = SD15_UNET_CONFIG if self.sc.model == "sd15" else TINY_UNET
        torch.manual_seed(0)
        with self.device:  # initialise on the device: seconds instead of a minute on the host for 860M weights
            unet = UNet2DConditionModel(**config)
        self.unet = unet.to(self.dtype).eval().requires_grad_(False)
        self.pipe = sd_pipeline(self.unet).to(self.device, self.dtype)
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        tokens, dim = TEXT[self.sc.model]
        g = torch.Generator().manual_seed(1)
        self.emb = torch.randn(1, tokens, dim, generator=g).to(self.device, self.dtype)
        self.neg = torch.randn(1, tokens, dim, generator=g).to(self.device, self.dtype)
        n = sum(p.numel() for p in self.unet.parameters())
        self.results["model"] = {
            "unet_params": n,
            "sample": [2, 4, self.sc.latent, self.sc.latent],
            "text": [2, tokens, dim],
            "cfg": True,
            "scheduler": "DDIM",
        }
        self.log(f"model: {self.sc.model}, {n / 1e6:.1f}M parameters, {self.sc.dtype}, latents {self.sc.latent}^2")

    def generate(self, steps: int | None = None, callback: Callable | None = None) -> torch.Tensor:
        kw = {"callback_on_step_end": callback} if callback else {}
        with torch.no_grad():
            out = self.pipe(
                prompt_embeds=self.emb,
                negative_prompt_embeds=self.neg,
                height=self.sc.latent,
                width=self.sc.latent,
                num_inference_steps=steps or self.sc.steps,
                output_type="latent",
                generator=torch.Generator(self.device).manual_seed(0),
                **kw,
            ).images
        return out

    def timed(self) -> tuple[float, torch.Tensor]:
        times, latents = [], None
        for _ in range(self.sc.reps):
            self.sync()
            t = time.perf_counter()
            latents = self.generate()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times), latents.float().cpu()

    def step_durations(self) -> list[float]:
        """Per-step durations inside one generation (synced timestamps at each step's end); step 0 left out."""
        stamps: list[float] = []

        def stamp(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            self.sync()
            stamps.append(time.perf_counter())
            return kwargs

        self.generate(callback=stamp)
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # durations of steps 1, 2, ...

    def host_and_gpu_us(self, call: Callable[[], Any], reps: int = 7) -> dict[str, float]:
        hosts, gpus = [], []
        with torch.no_grad():
            for _ in range(reps):
                self.sync()
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU work queued first: the host never waits below
                    start.record()
                t = time.perf_counter()
                call()
                hosts.append(time.perf_counter() - t)
                if self.cuda:
                    end.record()
                    torch.cuda.synchronize()
                    gpus.append(start.elapsed_time(end) / 1e3)
        res = {"host_us": statistics.median(hosts) * 1e6}
        if gpus:
            res["gpu_us"] = statistics.median(gpus) * 1e6
        return res

    def b2b_seconds(self, call: Callable[[], Any]) -> float:
        with torch.no_grad():  # 3 warm-up calls: CUDA graph trees warm up, record, replay
            return call_seconds(call, reps=10, warmup=3, device=self.device)

    def record(self, name: str, n: int, gen_s: float, latents: torch.Tensor, **extra: Any) -> dict[str, Any]:
        row = {"N": n, "gen_s": gen_s, "steps_per_s": self.sc.steps / gen_s, **extra}
        if self.ref is not None:
            row["psnr_db"] = latent_psnr(self.ref, latents)
        self.latents[f"{name} N={n}"] = latents
        self.results["methods"].setdefault(name, {})[str(n)] = row
        self.log(
            f"{name} N={n}: {gen_s * 1e3:.1f} ms/generation, {row['steps_per_s']:.1f} it/s"
            + (f", PSNR {row['psnr_db']:.1f} dB" if "psnr_db" in row else "")
        )
        return row

    # -- the methods -------------------------------------------------------------------------------------------
    def plain_eager(self) -> None:
        calls: list[tuple[tuple, dict]] = []
        hook = self.unet.register_forward_pre_hook(
            lambda m, a, k: calls.append((a, dict(k))) if not calls else None, with_kwargs=True
        )
        try:
            self.generate(steps=2)  # warm-up: CUDA context, cuDNN/cuBLAS set-up; records the pipeline's call
        finally:
            hook.remove()
        self.call = calls[0]
        gen_s, self.ref = self.timed()
        args, kwargs = self.call
        full = self.b2b_seconds(lambda: self.unet(*args, **kwargs))
        step_gen = statistics.median(self.step_durations())
        self.record(
            "plain eager",
            1,
            gen_s,
            self.ref,
            full_ms=full * 1e3,
            full_ms_gen=step_gen * 1e3,
            **self.host_and_gpu_us(lambda: self.unet(*args, **kwargs)),
        )

    def helper(self) -> None:
        from DeepCache import DeepCacheSDHelper

        for n in self.sc.intervals:
            helper = DeepCacheSDHelper(pipe=self.pipe)
            helper.set_params(cache_interval=n, cache_branch_id=self.sc.branch)  # = fxcache's branch on SD U-Nets
            helper.enable()
            try:
                self.generate(steps=n + 1)
                gen_s, latents = self.timed()
            finally:
                helper.disable()
            self.record("DeepCacheSDHelper", n, gen_s, latents)

    def fxcache(self, name: str, compile: Any) -> None:
        import fxcache
        from fxcache.runtime import StepInfo

        fxcache.enable(self.pipe, branch=self.sc.branch, interval=self.sc.intervals[0], compile=compile)
        cached = self.pipe.unet
        counters0 = _counters()
        try:
            t = time.perf_counter()
            self.generate(steps=self.sc.intervals[0] + 2)  # 2 full + shallow steps: captures, compiles, records
            self.sync()
            self.results.setdefault("one_time_s", {})[name] = time.perf_counter() - t
            counters1 = _counters()
            for n in self.sc.intervals:
                cached.configure(interval=n)
                gen_s, latents = self.timed()
                durations = self.step_durations()
                full_d = [d for i, d in enumerate(durations, start=1) if i % n == 0]
                shallow_d = [d for i, d in enumerate(durations, start=1) if i % n != 0]
                self.record(
                    name,
                    n,
                    gen_s,
                    latents,
                    f_gen=statistics.median(shallow_d) / statistics.median(full_d),
                    full_ms_gen=statistics.median(full_d) * 1e3,
                    shallow_ms_gen=statistics.median(shallow_d) * 1e3,
                )
            args, kwargs = self.call
            source, times = cached.step_source, {}
            try:
                for kind, step in (("full", 0), ("shallow", 1)):
                    cached.step_source = lambda step=step: StepInfo(step == 0, step, None)
                    times[kind] = self.b2b_seconds(lambda: cached(*args, **kwargs))
                    times[kind + "_call"] = self.host_and_gpu_us(lambda: cached(*args, **kwargs))
            finally:
                cached.step_source = source
                cached.reset()
            for row in self.results["methods"][name].values():
                row.update(
                    full_ms=times["full"] * 1e3,
                    shallow_ms=times["shallow"] * 1e3,
                    f_b2b=times["shallow"] / times["full"],
                    full_call=times["full_call"],
                    shallow_call=times["shallow_call"],
                )
            self.results.setdefault("counters", {})[name] = {
                "warm_up": _diff(counters0, counters1),
                "steady": _diff(counters1, _counters()),
            }
        finally:
            fxcache.disable(self.pipe)

    def plain_compiled(self) -> None:
        from fxcache.adapters.diffusers import swap_unet

        opts = {"mode": "reduce-overhead"} if self.cuda else {}
        compiled = torch.compile(self.unet, fullgraph=True, dynamic=False, **opts)
        if self.cuda:
            compiled = MarkStep(compiled)  # each call a new CUDA-graph step, as fxcache marks its own
        counters0 = _counters()
        with swap_unet(self.pipe, compiled):
            t = time.perf_counter()
            self.generate(steps=3)
            self.sync()
            self.results.setdefault("one_time_s", {})["plain compiled"] = time.perf_counter() - t
            counters1 = _counters()
            gen_s, latents = self.timed()
            args, kwargs = self.call
            step_gen = statistics.median(self.step_durations())
            full = self.b2b_seconds(lambda: compiled(*args, **kwargs))
            self.record(
                "plain compiled",
                1,
                gen_s,
                latents,
                full_ms=full * 1e3,
                full_ms_gen=step_gen * 1e3,
                **self.host_and_gpu_us(lambda: compiled(*args, **kwargs)),
            )
            self.results.setdefault("counters", {})["plain compiled"] = {
                "warm_up": _diff(counters0, counters1),
                "steady": _diff(counters1, _counters()),
            }

    def runtime_overhead(self) -> None:
        """Host time fxcache's own Python adds per call (flatten, signature, step logic, unflatten).

        A minimal U-Net whose graphs cost a few microseconds, so the difference between calling the transformed
        module and calling the plan's shallow graph directly with the same leaves is fxcache's runtime alone.
        Under ``compile=`` the same Python runs around the compiled graphs (plus Dynamo's guards, measured above).
        """
        import fxcache

        class Tiny(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.down = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)

            def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                up = torch.nn.functional.interpolate(self.down(x) * t, scale_factor=2.0)
                return torch.cat([up, x], dim=1)

        model = Tiny().to(self.device)
        x, t = torch.randn(1, 4, 8, 8, device=self.device), torch.ones((), device=self.device)
        cached = fxcache.transform(model, branch=0, interval=1_000_000)  # every call after the first is shallow
        with torch.no_grad():
            cached(x, t)
            plan = next(iter(cached.plans.values()))
            leaves = plan.flatten((x, t))
            *_, feature = plan.full(*leaves)  # the shallow graph takes the feature after the leaves

            def per_call_us(fn: Callable[[], Any], n: int = 2000) -> float:
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(n):
                        fn()
                    best = min(best, (time.perf_counter() - start) / n)
                self.sync()
                return best * 1e6

            module_us = per_call_us(lambda: cached(x, t))
            graph_us = per_call_us(lambda: plan.shallow(*leaves, feature))
        self.results["runtime_overhead_us"] = {"module": module_us, "graph": graph_us, "added": module_us - graph_us}
        self.log(f"fxcache runtime per call: {module_us - graph_us:.1f} us added ({module_us:.1f} us through the "
                 f"module, {graph_us:.1f} us for the shallow graph alone; eager, a minimal U-Net)")  # fmt: skip

    # -- the report --------------------------------------------------------------------------------------------
    def summarize(self) -> None:
        m = self.results["methods"]
        plain = m.get("plain compiled", {}).get("1")
        helper = m.get("DeepCacheSDHelper", {})
        for name in (FX_COMPILED, FX_OWN, "fxcache eager"):
            for key, row in m.get(name, {}).items():
                n = row["N"]
                if name == "fxcache eager" and f"DeepCacheSDHelper N={n}" in self.latents:
                    diff = self.latents[f"{name} N={n}"] - self.latents[f"DeepCacheSDHelper N={n}"]
                    row["max_abs_diff_vs_helper"] = diff.abs().max().item()
                if key in helper:
                    row["speedup_vs_helper"] = helper[key]["gen_s"] / row["gen_s"]
                base = m.get("plain eager", {}).get("1") if name == "fxcache eager" else plain
                if base is None:
                    continue
                row["speedup_vs_plain"] = base["gen_s"] / row["gen_s"]
                for f in ("f_b2b", "f_gen"):
                    if f in row:
                        ideal = n / (1 + (n - 1) * row[f])
                        row[f"ideal_{f}"] = ideal
                        row[f"fraction_of_ideal_{f}"] = row["speedup_vs_plain"] / ideal
        target = m.get(FX_COMPILED, {}).get(str(TARGET_N))
        if target is not None and self.cuda:
            checks = {
                "fraction_of_ideal": target.get("fraction_of_ideal_f_b2b"),
                "speedup_vs_helper": target.get("speedup_vs_helper"),
                "steps_per_s": target.get("steps_per_s"),
            }
            self.results["targets"] = {
                k: {"value": v, "min": TARGETS[k], "pass": v is not None and v >= TARGETS[k]} for k, v in checks.items()
            }
        self.save()
        print(report(self.results), flush=True)


T0 = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default=None, help="default: gpu on cuda, cpu on cpu")
    p.add_argument("--deadline-s", type=float, default=480.0, help="stop starting stages after this many seconds")
    p.add_argument("--preflight", action="store_true", help="only check imports, compiler, headers and device")
    a = p.parse_args(argv)
    missing = preflight(a.device)
    if a.preflight or missing:
        print("\n".join(missing) if missing else "preflight: all imports, a C compiler, Python.h and the device found")
        return 3 if missing else 0
    a.out.mkdir(parents=True, exist_ok=True)
    sc = SCENARIOS[a.scenario or ("gpu" if a.device == "cuda" else "cpu")]
    chk = Check(sc, a.device, a.out, T0 + a.deadline_s)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    chk.log(f"env: {json.dumps(chk.results['env'])}")
    chk.stage("build", chk.build)
    chk.stage("plain eager", chk.plain_eager)
    if chk.ref is None:
        return 1
    chk.stage("runtime overhead", chk.runtime_overhead)
    chk.stage("DeepCacheSDHelper", chk.helper)
    chk.stage(FX_COMPILED, lambda: chk.fxcache(FX_COMPILED, True), min_s=2 * sc.compile_min_s)
    chk.stage("plain compiled", chk.plain_compiled, min_s=sc.compile_min_s)
    chk.stage("fxcache eager", lambda: chk.fxcache("fxcache eager", False), min_s=10.0)
    if chk.cuda:  # fxcache's own CUDA graphs instead of Inductor's trees: the same kernels, another host path
        chk.stage(FX_OWN, lambda: chk.fxcache(FX_OWN, {"cudagraphs": True}), min_s=sc.compile_min_s)
    chk.summarize()
    return 1 if chk.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
