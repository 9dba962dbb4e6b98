"""ControlNet benchmark: fxcache (ControlNet pruned on shallow steps) vs DeepCacheSDHelper vs plain, eager.

    python -m benchmarks.controlnet [--intervals 3 5] [--gen-reps 2] [--out benchmarks/out]
    python -m benchmarks.controlnet --quick      # smoke run: reduced model, 64 px, 4 steps, a minute or two

(from the repository root). Model: a StableDiffusionControlNetPipeline with the SD1.5 U-Net architecture
(random weights) and ``ControlNetModel.from_unet`` of it (zero-convolutions given random weights, so the
residuals are not zero; the default conditioning embedding, which downsamples the control image 8x), fp32 on
CPU, 256 px (latents 32x32), classifier-free guidance (batch 2), 10 DDIM steps, branch 0. The VAE is a
four-block one with random weights, never run (latents out), there only to give the pipeline its 8x scale.

Engines, all eager, in one process, interleaved (round r runs every engine once, after one warm-up
generation each, which holds fxcache's captures; fxcache's module is made once and swapped in, so its graphs
serve every round and both N): the plain pipeline; for each N, ``DeepCacheSDHelper``
(whole ControlNet every step), ``fxcache.enable`` (the ControlNet pruned on shallow steps) and
``fxcache.enable(prune_controlnet=False)``. Reported: median generation time, speedups, whether fxcache's
latents equal the helper's bit for bit, and the pruned ControlNet's share of the ControlNet's FLOPs.
Target (issue 13): eager fxcache at N=5 takes <= 0.70x the helper's time. On a shared or loaded CPU the times
mean little: the run prints the load average at its start.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import fxcache
from benchmarks.common import fmt, log, machine, peak_rss_mib, table, write_csv, write_json
from fxcache.adapters.controlnet import installed
from fxcache.adapters.diffusers import swap_unet
from fxcache.demo.sd15 import LATENT_FACTOR, SD15_UNET_CONFIG, quiet_hf_logs, random_prompt_embeds

TARGET_N, MAX_TIME_VS_HELPER = 5, 0.70
_REDUCED = {"block_out_channels": (64, 128, 256, 256), "attention_head_dim": 4}  # as benchmarks.compile's CPU model


@dataclass(frozen=True)
class Scenario:
    size: int = 256  # pixels; latents size / 8
    steps: int = 10
    intervals: tuple[int, ...] = (3, 5)
    branch: int = 0
    gen_reps: int = 2  # interleaved timed rounds (median reported)
    model: str = "sd15"  # or "sd15-reduced" (--quick)
    seed: int = 0

    @property
    def name(self) -> str:
        ns = "-".join(map(str, self.intervals))
        return f"controlnet_{self.model}_{self.size}px_b2_float32_{self.steps}steps_N{ns}_b{self.branch}"


@dataclass
class Row:
    engine: str
    interval: int | None
    seconds: float
    times: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0
    speedup_vs_plain: float | None = None
    time_vs_helper: float | None = None  # this / the helper's at the same N
    identical_to_helper: bool | None = None
    controlnet_flops_fraction: float | None = None  # the pruned ControlNet's FLOPs / the whole one's
    peak_rss_mib: float = 0.0


def build_pipeline(sc: Scenario) -> Any:
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(sc.seed)
    config = dict(SD15_UNET_CONFIG, **(_REDUCED if sc.model == "sd15-reduced" else {}))
    unet = UNet2DConditionModel(**config).eval()
    controlnet = ControlNetModel.from_unet(unet).eval()
    with torch.no_grad():  # from_unet zeroes the output convolutions: give them weights
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.02)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
    ).eval()  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == LATENT_FACTOR
    return pipe


def run(sc: Scenario) -> tuple[list[Row], dict[str, Any]]:
    from DeepCache import DeepCacheSDHelper

    pipe = build_pipeline(sc)
    emb, neg = random_prompt_embeds(sc.seed)
    image = torch.rand(1, 3, sc.size, sc.size, generator=torch.Generator().manual_seed(sc.seed + 1))

    def generate() -> torch.Tensor:
        return pipe(
            prompt_embeds=emb, negative_prompt_embeds=neg, image=image, height=sc.size, width=sc.size,
            num_inference_steps=sc.steps, output_type="latent", generator=torch.Generator().manual_seed(sc.seed),
        ).images  # fmt: skip

    def plain() -> Callable[[], None]:
        return lambda: None

    def helper(n: int) -> Callable[[], None]:
        h = DeepCacheSDHelper(pipe=pipe)
        h.set_params(cache_interval=n, cache_branch_id=sc.branch)
        h.enable()
        return h.disable

    cached: list[Any] = []  # fxcache's U-Net module, made once: its graphs (and the ControlNet's) serve every round

    def ours(n: int, prune: bool) -> Callable[[], None]:
        swap = swap_unet(pipe, cached[0]) if cached else nullcontext()
        swap.__enter__()
        fxcache.enable(pipe, branch=sc.branch, interval=n, prune_controlnet=prune)  # on cached[0]: reconfigures
        cached[:] = [pipe.unet]

        def undo() -> None:
            fxcache.disable(pipe)
            swap.__exit__(None, None, None)

        return undo

    engines: dict[str, tuple[int | None, Callable[[], Callable[[], None]]]] = {"plain pipeline": (None, plain)}
    for n in sc.intervals:
        engines[f"DeepCacheSDHelper N={n}"] = (n, lambda n=n: helper(n))
        engines[f"fxcache N={n}, ControlNet pruned"] = (n, lambda n=n: ours(n, True))
        engines[f"fxcache N={n}, ControlNet whole"] = (n, lambda n=n: ours(n, False))

    rows = {name: Row(name, n, float("nan")) for name, (n, _) in engines.items()}
    latents: dict[str, torch.Tensor] = {}
    flops: dict[int, float] = {}
    for rnd in range(sc.gen_reps + 1):  # round 0: warm-up (fxcache captures there)
        for name, (n, setup) in engines.items():
            log(f"{'warm-up' if rnd == 0 else f'round {rnd}/{sc.gen_reps}'}: {name}")
            undo = setup()
            try:
                start = time.perf_counter()
                out = generate()
                seconds = time.perf_counter() - start
                hook = installed(pipe.controlnet)
                if hook is not None and n is not None:
                    plans = [p for p in hook.plans.values() if p is not None]
                    if plans:
                        flops[n] = plans[0].flops_fraction
            finally:
                undo()
            if rnd == 0:
                rows[name].warmup_seconds = seconds
                latents[name] = out
            else:
                rows[name].times.append(seconds)
    for r in rows.values():
        r.seconds = statistics.median(r.times)
        r.peak_rss_mib = peak_rss_mib()
    plain_s = rows["plain pipeline"].seconds
    for name, r in rows.items():
        r.speedup_vs_plain = plain_s / r.seconds
        if r.interval is not None:
            ref = f"DeepCacheSDHelper N={r.interval}"
            r.time_vs_helper = r.seconds / rows[ref].seconds
            r.identical_to_helper = torch.equal(latents[name], latents[ref])
            if "pruned" in name:
                r.controlnet_flops_fraction = flops.get(r.interval)
    checks = {}
    if TARGET_N in sc.intervals:
        v = rows[f"fxcache N={TARGET_N}, ControlNet pruned"].time_vs_helper
        checks[f"fxcache N={TARGET_N} time / helper time <= {MAX_TIME_VS_HELPER}"] = (v, v <= MAX_TIME_VS_HELPER)
    return list(rows.values()), checks


def report(sc: Scenario, env: dict[str, Any], rows: list[Row], checks: dict[str, tuple[float, bool]]) -> str:
    out = [
        f"run {sc.name}",
        f"machine: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}, "
        f"load average at start {env['load_average_1min_at_start']:.2f}",
        f"software: torch {env['torch']}, diffusers {env['diffusers']}, DeepCache {env['DeepCache']}, "
        f"fxcache {env['fxcache']}",
        f"model: {sc.model} U-Net + ControlNetModel.from_unet, random weights, float32, cpu, {sc.size} px "
        f"(latents {sc.size // LATENT_FACTOR}), CFG batch 2, {sc.steps} DDIM steps, branch {sc.branch}",
        f"time: median of {sc.gen_reps} interleaved rounds after a warm-up generation per engine",
        table(
            [
                "engine",
                "time (s)",
                "warm-up (s)",
                "vs plain",
                "vs helper",
                "bit-identical to helper",
                "ControlNet FLOPs kept",
            ],
            [
                [
                    r.engine,
                    fmt(r.seconds, ".2f"),
                    fmt(r.warmup_seconds, ".2f"),
                    fmt(r.speedup_vs_plain, ".2f") + "x",
                    fmt(r.time_vs_helper, ".2f") + ("x" if r.time_vs_helper is not None else ""),
                    fmt(r.identical_to_helper),
                    fmt(r.controlnet_flops_fraction, ".3f"),
                ]
                for r in rows
            ],
        ),  # fmt: skip
        "Targets",
        *(f"  {'PASS' if ok else 'FAIL'}  {name} (measured {v:.3f})" for name, (v, ok) in checks.items()),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: reduced model, 64 px, 4 steps, one round")
    p.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    p.add_argument("--gen-reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    a = p.parse_args(argv)
    quiet_hf_logs()
    sc = Scenario(intervals=tuple(a.intervals), gen_reps=a.gen_reps)
    if a.quick:
        sc = Scenario(size=64, steps=4, intervals=tuple(a.intervals), gen_reps=1, model="sd15-reduced")
    env = machine()
    rows, checks = run(sc)
    text = report(sc, env, rows, checks)
    print(text)
    base = a.out / sc.name
    result = {
        "run": sc.name,
        "scenario": asdict(sc),
        "machine": env,
        "rows": [asdict(r) for r in rows],
        "checks": {k: {"value": v, "passed": ok} for k, (v, ok) in checks.items()},
    }
    write_json(base.with_suffix(".json"), result)
    write_csv(
        base.with_suffix(".csv"), ["run", *Row.__dataclass_fields__], ({"run": sc.name, **asdict(r)} for r in rows)
    )
    base.with_suffix(".txt").write_text(text + "\n")
    log(f"wrote {base}.json, .csv, .txt")
    return 0 if all(r.identical_to_helper is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
