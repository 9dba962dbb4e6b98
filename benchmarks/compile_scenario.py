"""The compile benchmark's scenario: the methods, models, schedules, targets and definitions, and the
:class:`Scenario` a run measures (``python -m benchmarks.compile``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import fxcache
from fxcache.demo.sd15 import LATENT_FACTOR, SD15_TEXT_DIM, SD15_TEXT_TOKENS, SD15_UNET_CONFIG, sd15_unet

PLAIN_EAGER, PLAIN_COMPILED = "plain eager", "plain compiled"
HELPER, FX_EAGER, FX_COMPILED = "DeepCacheSDHelper", "fxcache eager", "fxcache compiled"
METHODS = (PLAIN_EAGER, PLAIN_COMPILED, HELPER, FX_EAGER, FX_COMPILED)
CACHED_METHODS = (HELPER, FX_EAGER, FX_COMPILED)

# Schedules fxcache can be measured with (--schedules). "uniform" is interval=N (the helper's only schedule);
# the other two are the paper's non-uniform 1:N schedule with its authors' settings (center 15 of 50 steps,
# power 1.4) scaled to the scenario's steps: as the reference code computes it, and as Eq. 7 reads literally.
SCHEDULES: dict[str, Callable[[int, int], fxcache.Schedule]] = {
    "uniform": lambda n, steps: fxcache.uniform(n),
    "nonuniform": lambda n, steps: fxcache.nonuniform(n, center=0.3 * steps, power=1.4),
    "eq7": lambda n, steps: fxcache.nonuniform(n, center=0.3 * steps, power=1.4, reference=False),
}

# Issue 3's GPU targets, all for fxcache compiled at N=5, branch 0.
GPU_TARGET_N, GPU_TARGET_BRANCH, GPU_TARGET_SIZE = 5, 0, 512
GPU_MIN_FRACTION_OF_IDEAL = 0.90  # of N / (1 + (N - 1) f), over plain compiled
GPU_MIN_SPEEDUP_VS_HELPER = 2.0
GPU_MIN_STEPS_PER_S = 300.0

MODELS = {
    "sd15": "SD1.5 U-Net architecture (860M parameters), random weights",
    "sd15-reduced": "SD1.5 U-Net block structure (4 down/up blocks, 2 layers each, cross-attention in 3 of them, "
    "12 skips) reduced: block_out_channels (64, 128, 256, 256) instead of (320, 640, 1280, 1280) and 4 attention "
    "heads instead of 8 (38M parameters instead of 860M), random weights",
}
_REDUCED = {"block_out_channels": (64, 128, 256, 256), "attention_head_dim": 4}  # diffusers: heads, for SD1.x

DEFINITIONS = {
    "full_step_ms, shallow_step_ms": "one U-Net call with the arguments the pipeline passes (CFG batch); mean of K "
    "calls of one kind between two device syncs, after warm-up calls (which record CUDA graphs). Full or shallow is "
    "chosen by the method's own step logic: the helper by the timestep's index (0: full, 1: shallow), fxcache by "
    "its step source (step 0: full, step 1: shallow)",
    "plain compiled": "torch.compile(unet, fullgraph=True, dynamic=False, mode/options as the scenario says); with "
    "CUDA graphs (reduce-overhead) a small module calls torch.compiler.cudagraph_mark_step_begin() before each U-Net "
    "call, as fxcache does for its graphs, so that later rounds replay the recorded graphs instead of recording again",
    "f": "shallow_step_ms / full_step_ms of the same method: from back-to-back U-Net calls",
    "full_step_gen_ms, shallow_step_gen_ms": "a step inside a real generation: the pipeline's callback_on_step_end "
    "takes a timestamp after each step (after a device sync), and a step is the time from one timestamp to the "
    "next, so it includes the scheduler's and CFG's per-step work; step 0 (which also holds the pipeline's set-up) "
    "is left out; median over the steps the schedule makes full (shallow) and over rounds. On CPU the timed "
    "generations carry the callback (the sync is a no-op); on CUDA, where a sync per step would change the timed "
    "generation, one extra generation per method and N in round 1 does",
    "f_gen": "shallow_step_gen_ms / full_step_gen_ms: the shallow/full ratio within a real generation",
    "generation_s": "median over gen_reps rounds of one pipeline call (after a warm-up generation at "
    "setup): prompt embeddings in, latents out (no text encoder, no VAE decode), wall time between two device "
    "syncs: the U-Net plus the scheduler's and CFG's per-step work",
    "steps_per_s": "effective steps per second = steps / generation_s (a shallow step counts as a step)",
    "speedup_vs_X": "X's generation_s / this generation_s; against the helper at the same N and branch",
    "ideal_speedup": "steps / (full_steps + shallow_steps * f): what caching could give at the measured f; equal to "
    "N / (1 + (N - 1) f) when N divides the steps",
    "fraction_of_ideal": "speedup over the same engine without caching (plain eager for the helper and fxcache "
    "eager, plain compiled for fxcache compiled) / ideal_speedup",
    "ideal_speedup_gen, fraction_of_ideal_gen": "the same with f_gen in place of f",
    "compile_s": "one-time cost: the warm-up generation minus its steps at the steady-state step times (capture, "
    "Dynamo, Inductor, CUDA-graph recording); for fxcache paid once per branch and shared by every N",
    "psnr_db": "the first timed generation's latents against plain eager's (peak = the reference's range; "
    "inf = identical)",
    "schedule": "fxcache rows named '... nonuniform' or '... eq7' run the paper's non-uniform 1:N schedule (center "
    "0.3 * steps, power 1.4; 'nonuniform' as the reference code computes it, 'eq7' as the paper's Eq. 7 reads) with "
    "the same graphs as the uniform row of that engine and branch; N sets the number of full steps, ceil(steps / N)",
}


@dataclass(frozen=True)
class Scenario:
    """What one run measures."""

    device: str = "cpu"
    model: str = "sd15-reduced"  # a key of MODELS
    size: int = 256  # pixels; latents are size / 8
    steps: int = 10  # DDIM steps per generation
    intervals: tuple[int, ...] = (3, 5)  # N values
    branches: tuple[int, ...] = (0, 1)
    dtype: str = "float32"
    mode: str = "default"  # torch.compile mode of both compiled methods
    freezing: bool = False  # Inductor's freezing (weights as constants) on top of the mode, for both
    batch: int = 2  # batch 1 with classifier-free guidance: negative + positive prompt
    step_reps: int = 5  # U-Net calls per step-time measurement
    gen_reps: int = 3  # timed generations per method, N and branch (median reported)
    seed: int = 0
    budget_s: float | None = None  # skip the remaining branches when the next would end past this
    schedules: tuple[str, ...] = ("uniform",)  # keys of SCHEDULES measured for fxcache; uniform always

    @property
    def latent(self) -> int:
        return self.size // LATENT_FACTOR

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def sample_shape(self) -> list[int]:
        return [self.batch, 4, self.latent, self.latent]

    @property
    def text_shape(self) -> list[int]:
        return [self.batch, SD15_TEXT_TOKENS, SD15_TEXT_DIM]

    @property
    def compile_kwargs(self) -> dict[str, Any]:
        """torch.compile's mode/options for both compiled methods (fullgraph and static shapes come on top)."""
        if not self.freezing:
            return {"mode": self.mode}
        from torch._inductor import list_mode_options

        # torch.compile takes a mode or options, not both: spell the mode out as its options.
        return {"options": {**list_mode_options(self.mode), "freezing": True}}

    @property
    def compile_label(self) -> str:
        return self.mode + ("+freezing" if self.freezing else "")

    @property
    def name(self) -> str:
        n = "-".join(map(str, self.intervals))
        b = "-".join(map(str, self.branches))
        extra = "".join(f"_{k}" for k in self.schedules if k != "uniform")
        return (f"compile_{self.model}_{self.size}px_b{self.batch}_{self.dtype}_{self.steps}steps_N{n}_br{b}_"
                f"{self.device}_{self.compile_label}{extra}")  # fmt: skip


def default_scenario(device: str, quick: bool = False) -> Scenario:
    """The issue's GPU scenario on CUDA, the reduced CPU scenario elsewhere; ``quick``: a smoke run of each."""
    if device == "cuda":
        if quick:
            return Scenario("cuda", "sd15", 256, 20, (3, 5), (0,), "float16", "reduce-overhead", step_reps=10,
                            gen_reps=1, budget_s=420.0)  # fmt: skip
        return Scenario("cuda", "sd15", 512, 50, (3, 5), (0, 1), "float16", "reduce-overhead", step_reps=20,
                        gen_reps=3, budget_s=420.0)  # fmt: skip
    if quick:
        return Scenario("cpu", "sd15-reduced", 64, 6, (2, 3), (0,), "float32", "default", step_reps=2, gen_reps=1)
    # Freezing: weights as constants, so Inductor runs oneDNN convolutions on pre-packed weights, the CPU
    # inference setting (without it Inductor's CPU convolutions are eager's, and compiled gains little).
    return Scenario("cpu", "sd15-reduced", 256, 10, (3, 5), (0, 1), "float32", "default", freezing=True, step_reps=5,
                    gen_reps=3)  # fmt: skip


def full_step_indices(interval: int, steps: int, kind: str = "uniform") -> set[int]:
    """The steps of a generation that run in full, on a schedule of SCHEDULES (N = 1: every step)."""
    if interval == 1:
        return set(range(steps))
    schedule = SCHEDULES[kind](interval, steps)
    return {i for i in range(steps) if schedule.is_full(i, steps)}


def counts(interval: int, steps: int, kind: str = "uniform") -> tuple[int, int]:
    """(full, shallow) steps of a generation on a schedule of SCHEDULES (N = 1: every step full)."""
    full = len(full_step_indices(interval, steps, kind))
    return full, steps - full


def build_unet(model: str, seed: int) -> torch.nn.Module:
    if model == "sd15":
        return sd15_unet(seed)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**SD15_UNET_CONFIG, **_REDUCED}).eval()
