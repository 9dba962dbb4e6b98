"""Compiled DeepCache benchmark: the plain U-Net eager and compiled, DeepCacheSDHelper, fxcache eager and compiled.

    python benchmarks/bench_compile.py [--device auto|cpu|cuda] [--out DIR] [--quick]
    python benchmarks/bench_compile.py --device cpu --size 128 --intervals 3,5 --branches 0   # overrides
    python benchmarks/bench_compile.py --no-freezing  # the CPU scenario without Inductor's freezing

One process, one pipeline, the same prompt embeddings and the same initial noise for five methods:

    plain eager        the U-Net as built (the reference every PSNR is measured against)
    plain compiled     torch.compile(unet, mode=M, fullgraph=True, dynamic=False)
    DeepCacheSDHelper  DeepCache's reference helper (eager), at every N and branch
    fxcache eager      fxcache.enable(pipe, branch=B, interval=N)
    fxcache compiled   fxcache.enable(pipe, branch=B, interval=N, compile=M)

M is one torch.compile mode for both compiled methods: "reduce-overhead" (CUDA graphs) on CUDA, Inductor's
"default" with freezing (weights as constants) on CPU (``--mode`` and ``--[no-]freezing`` change it for both).
fxcache compiles one full and one shallow graph per branch and keeps them across N (only the schedule changes),
so a run compiles 1 + 2 x branches graphs.

Scenarios (a :class:`Scenario` in, :class:`Row` s out; see :func:`default_scenario`):

* GPU, as issue 3 sets it: the SD1.5 U-Net architecture with random weights, fp16, 512 px (64x64 latents),
  batch 1 with classifier-free guidance (the U-Net sees batch 2), 50 DDIM steps, N in {3, 5}, branch in {0, 1}.
* CPU: a reduced scenario that fits a few minutes on 2 cores (fp32, 10 steps, a smaller model; the run prints
  which). Inductor's C++ compile of the full SD1.5 graph alone takes minutes there.

Every method is set up with one warm-up generation (which captures and compiles: the one-time cost is that
generation minus its steady-state cost) and measured once right away (round 1). Then rounds 2..``gen_reps``
are interleaved: in each, every method generates once at every N, then its full and shallow step times are
taken (the U-Net called directly with the arguments the pipeline passes, K calls between two device syncs after
warm-up calls that also record CUDA graphs). Reported per method and (N, branch): medians of the step times and
of the end-to-end generation time, effective steps/s, speedup against plain eager, plain compiled and the helper
at the same N and branch and against the ideal N / (1 + (N - 1) f), the one-time cost, peak memory, and the PSNR
of the latents against plain eager's. Interleaving matters on a shared CPU, whose speed drifts by tens of
percent over minutes.

Targets, printed PASS/FAIL (benchmarks, not tests: a FAIL does not change the exit status):

* CUDA: fxcache compiled at N=5, branch 0 reaches >= 90% of the ideal speedup over plain compiled (f from its own
  compiled shallow and full step times), is >= 2x faster end-to-end than DeepCacheSDHelper, and runs >= 300
  effective steps/s at 512 px.
* CPU: fxcache compiled is faster end-to-end than fxcache eager and than DeepCacheSDHelper at each N and branch.

Writes ``<out>/<run>.json``, ``.csv`` and ``.png`` (speedup against N, one line per method; needs matplotlib),
each naming the device, torch and triton versions, dtype, shapes and steps. The exit status is 1 when a
measurement raised (its traceback is printed and the run goes on), else 0.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib.metadata
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, also when imported from elsewhere

from bench_core import _fmt, _jsonable, _table, machine  # noqa: E402

import fxcache  # noqa: E402
from fxcache.adapters.diffusers import _set_unet, branch_from_deepcache_id  # noqa: E402  (a swap that leaves pipe.config alone)
from fxcache.compile import uses_cudagraphs  # noqa: E402
from fxcache.sd15 import (  # noqa: E402
    _SD15_UNET_CONFIG,
    LATENT_FACTOR,
    SD15_TEXT_DIM,
    SD15_TEXT_TOKENS,
    psnr,
    quiet_hf_logs,
    random_prompt_embeds,
    sd15_unet,
    sd_pipeline,
)

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
    "f": "shallow_step_ms / full_step_ms of the same method",
    "generation_s": "median over gen_reps rounds of one pipeline call (after a warm-up generation at "
    "setup): prompt embeddings in, latents out (no text encoder, no VAE decode), wall time between two device "
    "syncs: the U-Net plus the scheduler's and CFG's per-step work",
    "steps_per_s": "effective steps per second = steps / generation_s (a shallow step counts as a step)",
    "speedup_vs_X": "X's generation_s / this generation_s; against the helper at the same N and branch",
    "ideal_speedup": "steps / (full_steps + shallow_steps * f): what caching could give at the measured f; equal to "
    "N / (1 + (N - 1) f) when N divides the steps",
    "fraction_of_ideal": "speedup over the same engine without caching (plain eager for the helper and fxcache "
    "eager, plain compiled for fxcache compiled) / ideal_speedup",
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


@dataclass
class Check:
    name: str
    value: float | None
    target: str
    status: str  # PASS, FAIL or SKIP (not measured)
    note: str = ""


# -- measuring -------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, flush=True)


def _counts(interval: int, steps: int, kind: str = "uniform") -> tuple[int, int]:
    """(full, shallow) steps of a generation on a schedule of SCHEDULES (N = 1: every step full)."""
    if interval == 1:
        return steps, 0
    schedule = SCHEDULES[kind](interval, steps)
    full = sum(schedule.is_full(i, steps) for i in range(steps))
    return full, steps - full


def _reset_peak_rss() -> bool:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mib() -> float:
    return _status_mib("VmRSS") or 0.0


def _drop_restored_forwards(unet: torch.nn.Module) -> None:
    # DeepCacheSDHelper.disable() puts each original bound `forward` back as an instance attribute; dropping those
    # leaves the modules exactly as before enable(), so later captures see plain modules.
    for m in unet.modules():
        fwd = m.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(m).forward:
            del m.__dict__["forward"]


def _fixed_step(step: int) -> Callable[[], Any]:
    """A CachedModule step source that numbers every call ``step`` of a running generation."""
    try:  # newer fxcache: a StepInfo(new_generation, step, total)
        from fxcache.runtime import StepInfo
    except ImportError:  # fxcache 0.1.0: a (new_generation, step) tuple
        return lambda: (False, step)
    info = StepInfo(False, step, None)
    return lambda: info


def _deepcache_id(unet: torch.nn.Module, branch: int) -> int:
    """The helper's cache_branch_id for fxcache branch ``branch`` (equal on SD1.x, two layers per block)."""
    for cid in range(3 * len(unet.down_blocks)):
        if branch_from_deepcache_id(unet, cid) == branch:
            return cid
    raise ValueError(f"branch {branch} has no DeepCacheSDHelper cache_branch_id on this U-Net")


def build_unet(model: str, seed: int) -> torch.nn.Module:
    if model == "sd15":
        return sd15_unet(seed)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**_SD15_UNET_CONFIG, **_REDUCED}).eval()


@dataclass
class Engine:
    """One method in one configuration: set up once (warm-up, capture, compile), then measured in rounds."""

    method: str
    branch: int | None
    intervals: tuple[int, ...]  # (1,) for the plain model
    install: Callable[[int], None]  # put the method into the pipeline at interval N
    uninstall: Callable[[], None]  # put the plain U-Net back
    step_times: Callable[[], tuple[float, float | None]]  # (full, shallow) seconds of one U-Net step, measured now
    counters: Any = None  # fxcache's CacheState: checks that a generation ran the steps the schedule says
    warmup_s: float | None = None
    warmup_steps: int = 0
    warmup_interval: int = 1
    kind: str = "uniform"  # fxcache's schedule, a key of SCHEDULES
    module: Any = None  # fxcache's CachedModule, shared by the schedule variants of one engine
    gens: dict[int, list[float]] = field(default_factory=dict)  # N -> seconds of each timed generation
    peaks: dict[int, float] = field(default_factory=dict)  # N -> MiB
    working: dict[int, float] = field(default_factory=dict)  # N -> MiB
    kept_mib: float | None = None
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # N -> the first timed generation's latents
    steps: list[tuple[float, float | None]] = field(default_factory=list)  # one (full, shallow) per round
    failed: bool = False

    @property
    def label(self) -> str:
        return self.method if self.branch is None else f"{self.method}, branch {self.branch}"


class Bench:
    """Sets every method of a :class:`Scenario` up on one pipeline, then measures them in interleaved rounds.

    Setup, one method after the other: a warm-up generation, which captures and compiles (that time minus the
    steady-state cost of its steps is the method's one-time cost), then round 1 of its measurements: one
    generation at every N and its full and shallow step times. A run cut short still reports every method set up
    by then. Rounds 2..``gen_reps`` follow for all methods together, interleaved; medians are reported.
    Interleaving spreads slow drifts of the machine (a shared CPU's speed wanders by tens of percent over minutes)
    over every method instead of charging them to whichever one ran during a slow spell.
    """

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.device = torch.device(sc.device)
        self.cuda = self.device.type == "cuda"
        self.engines: list[Engine] = []
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.start = time.perf_counter()
        self.peak_resets = self.cuda or _reset_peak_rss()
        self.unet = build_unet(sc.model, sc.seed)
        self.params = sum(p.numel() for p in self.unet.parameters())
        self.pipe = sd_pipeline(self.unet).to(device=self.device, dtype=sc.torch_dtype)
        assert self.pipe.unet is self.unet, "pipe.to() moves the U-Net in place"
        emb, neg = random_prompt_embeds(sc.seed)
        self.emb = emb.to(device=self.device, dtype=sc.torch_dtype)
        self.neg = neg.to(device=self.device, dtype=sc.torch_dtype)
        self.call: tuple[tuple, dict[str, Any]] | None = None  # one U-Net call as the pipeline makes it
        self.eager_step_s = 0.0  # from plain eager's warm-up: sizes the time budget
        self.checkpoint: Callable[[], None] | None = None  # writes partial results after each stage

    # -- primitives ---------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, msg: str) -> None:
        _log(f"[{self.elapsed():6.1f} s] {msg}")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint()

    def generate(self, steps: int) -> torch.Tensor:
        sc = self.sc
        return self.pipe(
            prompt_embeds=self.emb, negative_prompt_embeds=self.neg, height=sc.latent, width=sc.latent,
            num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(sc.seed),
        ).images  # fmt: skip

    def generation_seconds(self, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        self.generate(steps)
        self.sync()
        return time.perf_counter() - start

    def memory_mib(self) -> float:
        """Memory in use now: allocated by PyTorch's CUDA allocator, or the process's resident set."""
        return torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else _rss_mib()

    def timed_generation(self) -> tuple[torch.Tensor, float, float, float]:
        """(latents, seconds, peak MiB, peak MiB over the start) of one full-length generation."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        base = self.memory_mib()
        start = time.perf_counter()
        latents = self.generate(self.sc.steps)
        self.sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else _peak_rss_mib()
        return latents.detach().float().cpu(), seconds, peak, peak - base

    def call_seconds(self, call: Callable[[], Any]) -> float:
        """Mean seconds of ``call()`` over ``step_reps`` calls between two syncs, after warm-up calls."""
        reps = self.sc.step_reps
        with torch.no_grad():
            for _ in range(3 if self.cuda else 1):  # CUDA graph trees: warm up, record, replay
                call()
            self.sync()
            start = time.perf_counter()
            for _ in range(reps):
                call()
            self.sync()
        return (time.perf_counter() - start) / reps

    def step_args(self, timestep: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        assert self.call is not None, "plain eager is set up first and records the pipeline's U-Net call"
        args, kwargs = self.call
        if timestep is not None:
            args = (args[0], timestep, *args[2:])
        return args, kwargs

    def warm_up(self, eng: Engine, steps: int, interval: int, what: str) -> Engine:
        self.log(f"{eng.label}: warm-up generation ({steps} steps at N={interval}; {what})")
        eng.install(interval)
        try:
            eng.warmup_s = self.generation_seconds(steps)
        finally:
            eng.uninstall()
        eng.warmup_steps, eng.warmup_interval = steps, interval
        return eng

    # -- setting the methods up -------------------------------------------------------------------------
    def plain_eager(self) -> Engine:
        unet, pipe = self.unet, self.pipe
        calls: list[tuple[tuple, dict[str, Any]]] = []

        def record(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not calls:
                calls.append((args, dict(kwargs)))

        def steps() -> tuple[float, None]:
            args, kwargs = self.step_args()
            return self.call_seconds(lambda: unet(*args, **kwargs)), None

        eng = Engine(PLAIN_EAGER, None, (1,), lambda n: _set_unet(pipe, unet), lambda: None, steps)
        warm_steps = min(self.sc.steps, 3)
        handle = unet.register_forward_pre_hook(record, with_kwargs=True)
        try:
            self.warm_up(eng, warm_steps, 1, "records the U-Net call the pipeline makes")
        finally:
            handle.remove()
        self.call = calls[0]
        # A second short generation, past first-call costs (CUDA context, cuBLAS/cuDNN set-up), sizes the budget.
        self.eager_step_s = self.generation_seconds(warm_steps) / warm_steps
        return eng

    def plain_compiled(self) -> Engine:
        sc, unet, pipe = self.sc, self.unet, self.pipe
        compiled = torch.compile(unet, fullgraph=True, dynamic=False, **sc.compile_kwargs)
        cudagraphs = uses_cudagraphs(sc.compile_kwargs, self.device)

        def steps() -> tuple[float, None]:
            args, kwargs = self.step_args()

            def step() -> None:
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # each call is one iteration
                compiled(*args, **kwargs)

            return self.call_seconds(step), None

        eng = Engine(PLAIN_COMPILED, None, (1,), lambda n: _set_unet(pipe, compiled), lambda: _set_unet(pipe, unet),
                     steps)  # fmt: skip
        return self.warm_up(eng, min(sc.steps, 3), 1, f"compiles, {sc.compile_label}")

    def fxcache(self, branch: int, compiled: bool) -> Engine:
        """One fxcache.enable per branch; its graphs serve every N (only the schedule changes)."""
        sc, unet, pipe = self.sc, self.unet, self.pipe
        first = sc.intervals[0]
        fxcache.enable(pipe, branch=branch, interval=first, compile=sc.compile_kwargs if compiled else False)
        cached = pipe.unet
        fxcache.disable(pipe)

        def install(n: int) -> None:
            # the graphs are kept: only the schedule changes
            cached.fxcache_config = dataclasses.replace(cached.fxcache_config, interval=n, schedule=None)
            _set_unet(pipe, cached)  # what fxcache.enable did, with this module and its graphs

        def steps() -> tuple[float, float]:
            args, kwargs = self.step_args()
            source = cached.step_source
            # step 0 full, step 1 shallow: the uniform schedule (a variant's may need the total number of steps)
            cached.fxcache_config = dataclasses.replace(cached.fxcache_config, interval=first, schedule=None)
            try:
                cached.step_source = _fixed_step(0)  # step 0 of the generation: full
                full = self.call_seconds(lambda: cached(*args, **kwargs))
                cached.step_source = _fixed_step(1)  # step 1 (N >= 2): shallow, reading the cache just written
                shallow = self.call_seconds(lambda: cached(*args, **kwargs))
            finally:
                cached.step_source = source
                cached.reset()
            return full, shallow

        eng = Engine(FX_COMPILED if compiled else FX_EAGER, branch, sc.intervals, install,
                     lambda: _set_unet(pipe, unet), steps, counters=cached.fxcache_state, module=cached)  # fmt: skip
        what = "captures and compiles the full and shallow graphs" if compiled else "captures"
        return self.warm_up(eng, min(sc.steps, first + 2), first, what)  # 2 full and >= 2 shallow steps

    def schedule_variant(self, base: Engine, kind: str) -> Engine:
        """``base`` (an fxcache engine) on another schedule: the same module and graphs, so no setup of its own."""
        cached, pipe, steps = base.module, self.pipe, self.sc.steps

        def install(n: int) -> None:
            schedule = SCHEDULES[kind](n, steps)
            cached.fxcache_config = dataclasses.replace(cached.fxcache_config, interval=None, schedule=schedule)
            _set_unet(pipe, cached)

        return Engine(f"{base.method} {kind}", base.branch, base.intervals, install, base.uninstall, base.step_times,
                      counters=base.counters, kind=kind, module=cached)  # fmt: skip

    def helper(self, branch: int) -> Engine:
        from DeepCache import DeepCacheSDHelper

        sc, unet, pipe = self.sc, self.unet, self.pipe
        cid = _deepcache_id(unet, branch)
        active: list[Any] = []

        def install(n: int) -> None:
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=n, cache_branch_id=cid)
            helper.enable()
            active.append(helper)

        def uninstall() -> None:
            while active:
                active.pop().disable()
            _drop_restored_forwards(unet)

        def steps() -> tuple[float, float]:
            # The helper numbers a call by its timestep's index in scheduler.timesteps, here the last generation's
            # (a full-length one): index 0 runs in full, index 1 shallow.
            timesteps = pipe.scheduler.timesteps
            full_args, kwargs = self.step_args(timesteps[0])
            shallow_args, _ = self.step_args(timesteps[1])
            install(sc.intervals[0])
            try:
                full = self.call_seconds(lambda: pipe.unet(*full_args, **kwargs))
                shallow = self.call_seconds(lambda: pipe.unet(*shallow_args, **kwargs))
            finally:
                uninstall()
            return full, shallow

        eng = Engine(HELPER, branch, sc.intervals, install, uninstall, steps)
        return self.warm_up(eng, min(sc.steps, sc.intervals[0] + 2), sc.intervals[0], f"cache_branch_id {cid}")

    # -- running ------------------------------------------------------------------------------------------
    def guarded(self, label: str, fn: Callable[[], Any], eng: Engine | None = None) -> Any:
        try:
            return fn()
        except Exception as exc:  # a benchmark reports and goes on; the exit status says it failed
            traceback.print_exc()
            first_line = (str(exc).strip().splitlines() or [""])[0]
            self.errors.append(f"{label}: {type(exc).__name__}: {first_line}")
            self.log(f"{label}: FAILED ({type(exc).__name__}); going on without it")
            if eng is not None:
                eng.failed = True
            _set_unet(self.pipe, self.unet)
            return None

    def add(self, label: str, setup: Callable[[], Engine]) -> None:
        gc.collect()
        before = self.memory_mib()
        eng = self.guarded(f"{label}: setup", setup)
        if eng is not None:
            gc.collect()
            eng.kept_mib = self.memory_mib() - before
            self.engines.append(eng)
            self.measure_engine(eng, "round 1")
        self.save()

    def measure_estimate(self, more_engines: int = 0) -> float:
        """Seconds the remaining rounds will take, sized generously from plain eager's step time."""
        sc = self.sc
        combos = sum(len(e.intervals) for e in self.engines) + more_engines * len(sc.intervals)
        calls = 2 * (len(self.engines) + more_engines) * ((3 if self.cuda else 1) + sc.step_reps)
        return sc.gen_reps * (combos * sc.steps + calls) * self.eager_step_s

    def run(self) -> None:
        sc = self.sc
        before = self.memory_mib()
        with torch.no_grad():
            self.engines.append(self.plain_eager())  # the reference and the recorded call: nothing works without it
        self.engines[0].kept_mib = self.memory_mib() - before
        self.measure_engine(self.engines[0], "round 1")
        self.save()
        self.add(PLAIN_COMPILED, self.plain_compiled)
        last_branch_s: float | None = None
        for i, b in enumerate(sc.branches):
            need = (last_branch_s or 0.0) + self.measure_estimate(more_engines=3)
            if sc.budget_s and last_branch_s is not None and self.elapsed() + need > sc.budget_s:
                skipped = ", ".join(map(str, sc.branches[i:]))
                self.notes.append(f"time budget: branch(es) {skipped} skipped: {self.elapsed():.0f} s spent, the last "
                                  f"branch's setup took {last_branch_s:.0f} s and measuring would take about "
                                  f"{self.measure_estimate(3):.0f} s, budget {sc.budget_s:.0f} s")  # fmt: skip
                self.log(self.notes[-1])
                break
            t0 = time.perf_counter()
            self.add(f"{FX_EAGER}, branch {b}", lambda b=b: self.fxcache(b, compiled=False))
            self.add(f"{FX_COMPILED}, branch {b}", lambda b=b: self.fxcache(b, compiled=True))
            self.add(f"{HELPER}, branch {b}", lambda b=b: self.helper(b))
            bases = [e for e in self.engines if e.branch == b and e.method in (FX_EAGER, FX_COMPILED)]
            for kind in (k for k in sc.schedules if k != "uniform"):
                for base in bases:
                    label = f"{base.method} {kind}, branch {b}"
                    self.add(label, lambda base=base, k=kind: self.schedule_variant(base, k))
            last_branch_s = time.perf_counter() - t0
        self.measure()

    def measure_engine(self, eng: Engine, label: str) -> None:
        """Round 1, right after the method's setup: a run cut short still has every method set up so far."""
        for n in eng.intervals:
            self.guarded(f"{eng.label}, N={n}: generation", lambda n=n: self.generation(eng, n), eng)
        if not eng.failed:
            self.guarded(f"{eng.label}: step times", lambda: eng.steps.append(eng.step_times()), eng)
        if not eng.failed:
            self.log(f"  {label}: {self.summary(eng)}")

    def summary(self, eng: Engine) -> str:
        gens = ", ".join(f"N={n} {eng.gens[n][-1]:.3f} s" for n in eng.intervals if n in eng.gens)
        full, shallow = eng.steps[-1] if eng.steps else (None, None)
        steps = "" if full is None else f"; full step {1e3 * full:.1f} ms"
        steps += "" if shallow is None else f", shallow step {1e3 * shallow:.1f} ms"
        return f"{eng.label}: {gens}{steps}"

    def measure(self) -> None:
        """Rounds 2.. gen_reps, interleaved: every method generates at every N, then every method's step times."""
        sc = self.sc
        for r in range(1, sc.gen_reps):
            self.log(f"round {r + 1}/{sc.gen_reps}: one generation per method and N, then step times")
            for eng in [e for e in self.engines if not e.failed]:
                for n in eng.intervals:
                    self.guarded(f"{eng.label}, N={n}: generation", lambda eng=eng, n=n: self.generation(eng, n), eng)
            for eng in [e for e in self.engines if not e.failed]:
                self.guarded(f"{eng.label}: step times", lambda eng=eng: eng.steps.append(eng.step_times()), eng)
            for eng in [e for e in self.engines if not e.failed]:
                self.log(f"  {self.summary(eng)}")
            self.save()

    def generation(self, eng: Engine, n: int) -> None:
        st = eng.counters
        before = (st.full_steps, st.shallow_steps) if st is not None else None
        eng.install(n)
        try:
            latents, seconds, peak, working = self.timed_generation()
        finally:
            eng.uninstall()
        eng.gens.setdefault(n, []).append(seconds)
        eng.peaks[n] = max(eng.peaks.get(n, 0.0), peak)
        eng.working[n] = max(eng.working.get(n, 0.0), working)
        eng.latents.setdefault(n, latents)
        if before is not None:
            ran = st.full_steps - before[0], st.shallow_steps - before[1]
            if ran != _counts(n, self.sc.steps, eng.kind):
                self.notes.append(f"{eng.label} N={n}: ran {ran[0]}+{ran[1]} full+shallow steps, expected "
                                  f"{_counts(n, self.sc.steps, eng.kind)}")  # fmt: skip

    # -- results --------------------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """One row per method, N and branch measured so far, with speedups against every baseline."""
        sc = self.sc
        reference = next((e.latents.get(1) for e in self.engines if e.method == PLAIN_EAGER), None)
        rows: list[Row] = []
        for eng in self.engines:
            full_s = statistics.median(s[0] for s in eng.steps) if eng.steps else None
            shallows = [s[1] for s in eng.steps if s[1] is not None]
            shallow_s = statistics.median(shallows) if shallows else None
            steady = None
            if full_s is not None and eng.warmup_s is not None:
                wf, ws = _counts(eng.warmup_interval, eng.warmup_steps)
                steady = wf * full_s + ws * (shallow_s if shallow_s is not None else full_s)
            for n in eng.intervals:
                if n not in eng.gens:
                    continue
                gen_s = statistics.median(eng.gens[n])
                n_full, n_shallow = _counts(n, sc.steps, eng.kind)
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
                        psnr_db=None if reference is None else psnr(reference, eng.latents[n]),
                    )
                )  # fmt: skip
        by = {(r.method, r.interval, r.branch): r for r in rows}
        latents = {(e.method, n, e.branch): x for e in self.engines for n, x in e.latents.items()}
        eager, comp = by.get((PLAIN_EAGER, 1, None)), by.get((PLAIN_COMPILED, 1, None))
        for r in rows:
            helper = by.get((HELPER, r.interval, r.branch)) if r.method in CACHED_METHODS else None
            r.speedup_vs_plain_eager = eager.generation_s / r.generation_s if eager else None
            r.speedup_vs_plain_compiled = comp.generation_s / r.generation_s if comp else None
            r.speedup_vs_helper = helper.generation_s / r.generation_s if helper else None
            if r.f is not None:
                r.ideal_speedup = sc.steps / (r.full_steps + r.shallow_steps * r.f)
                own = comp if r.method.startswith(FX_COMPILED) else eager
                if own is not None:
                    r.fraction_of_ideal = own.generation_s / r.generation_s / r.ideal_speedup
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


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def environment(sc: Scenario, bench: Bench | None = None) -> dict[str, Any]:
    env = machine()  # host CPU, torch, diffusers, DeepCache, fxcache, load average
    env["device"] = sc.device
    env["triton"] = _version("triton", "pytorch-triton")
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
            "vs compiled", "vs helper", "ideal", "% ideal", "one-time s", "peak MiB", "work MiB", "kept MiB",
            "PSNR dB"]  # fmt: skip


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _cells(r: Row) -> list[str]:
    return [
        r.method, str(r.interval), "" if r.branch is None else str(r.branch), _fmt(r.full_step_ms, ".1f"),
        _fmt(r.shallow_step_ms, ".1f"), _fmt(r.f, ".3f"), f"{r.full_steps}+{r.shallow_steps}",
        _fmt(r.generation_s, ".3f"), _fmt(r.steps_per_s, ".1f"), _x(r.speedup_vs_plain_eager),
        _x(r.speedup_vs_plain_compiled), _x(r.speedup_vs_helper), _x(r.ideal_speedup),
        "" if r.fraction_of_ideal is None else f"{100 * r.fraction_of_ideal:.0f}%", _fmt(r.compile_s, ".1f"),
        _fmt(r.peak_memory_mib, ".0f"), _fmt(r.working_memory_mib, ".0f"), _fmt(r.kept_memory_mib, ".0f"),
        _fmt(r.psnr_db, ".1f"),
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
        _table(_COLUMNS, [_cells(r) for r in rows]),
        "",
        "gen s: one pipeline call (median), latents out, between device syncs; steps/s = steps / gen s (effective: a "
        "shallow step counts as a step);",
        "vs X: X's gen s / this gen s (helper: same N and branch); ideal = steps / (full + shallow * f) "
        "= N/(1+(N-1)f) when N divides the steps;",
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
        value = "not measured" if c.value is None else _fmt(c.value, ".3g")
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
    out_dir.mkdir(parents=True, exist_ok=True)
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
    json_path = out_dir / f"{sc.name}.json"
    json_path.write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    csv_path = out_dir / f"{sc.name}.csv"
    with csv_path.open("w", newline="") as fh:  # one row per measurement, the run's context on every row
        writer = csv.DictWriter(fh, fieldnames=[*info, *(f.name for f in fields(Row))])
        writer.writeheader()
        for r in rows:
            writer.writerow({**info, **asdict(r)})
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
        _log("note: matplotlib is not installed, so no PNG chart was drawn (pip install matplotlib); "
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


# -- command line -----------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,5; got {text!r}") from exc


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SCHEDULES]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown schedule(s) {bad or text!r}; use some of {', '.join(SCHEDULES)}")
    return ("uniform", *(k for k in kinds if k != "uniform"))


def parse(argv: list[str] | None) -> tuple[Scenario, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when available, else cpu (default auto)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for JSON, CSV and PNG")
    parser.add_argument("--quick", action="store_true", help="a smoke run: smaller sizes, fewer steps, one branch")
    parser.add_argument("--model", choices=sorted(MODELS), help="override the scenario's model")
    parser.add_argument("--size", type=int, help="pixels, multiple of 64 (latents are size/8)")
    parser.add_argument("--steps", type=int, help="DDIM steps per generation")
    parser.add_argument("--intervals", type=_ints, help="N values, comma-separated, each >= 2 (e.g. 3,5)")
    parser.add_argument("--branches", type=_ints, help="branches, comma-separated (e.g. 0,1)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="override the dtype")
    parser.add_argument("--mode", help="torch.compile mode for both compiled methods (default: per device)")
    parser.add_argument("--freezing", action=argparse.BooleanOptionalAction, default=None,
                        help="Inductor's freezing (weights as constants) for both compiled methods (default: on for "
                        "the CPU scenario, off on CUDA)")  # fmt: skip
    parser.add_argument("--step-reps", type=int, help="U-Net calls per step-time measurement")
    parser.add_argument("--gen-reps", type=int, help="timed generations per method, N and branch (median)")
    parser.add_argument(
        "--schedules",
        type=_kinds,
        help=f"fxcache schedules, comma-separated, from {', '.join(SCHEDULES)} (default uniform)",
    )
    parser.add_argument("--budget-s", type=float, help="skip remaining branches past this many seconds (0: none)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Inductor's usual cache folder (default: a fresh temporary one, so compile times "
                        "are cold)")  # fmt: skip
    a = parser.parse_args(argv)
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False). The GPU "
                     "scenario needs one; run with --device cpu (or auto) for the reduced CPU scenario.")  # fmt: skip
    sc = default_scenario(device, a.quick)
    names = ("model", "size", "steps", "intervals", "branches", "dtype", "mode", "freezing", "step_reps", "gen_reps",
             "budget_s", "schedules")  # fmt: skip
    overrides = {k: getattr(a, k) for k in names if getattr(a, k) is not None}
    sc = dataclasses.replace(sc, **overrides)
    from torch._inductor import list_mode_options

    if sc.size < 64 or sc.size % 64:
        parser.error(f"--size {sc.size}: use a multiple of 64 (latents are size/8 and must be a multiple of 8)")
    if sc.steps < 2 or not sc.intervals or min(sc.intervals) < 2 or not sc.branches or min(sc.branches) < 0:
        parser.error("--steps must be >= 2, every N >= 2 (N=1 is the plain model, always measured) and branches >= 0")
    if sc.step_reps < 1 or sc.gen_reps < 1:
        parser.error("--step-reps and --gen-reps must be >= 1")
    if sc.mode not in list_mode_options():
        parser.error(f"--mode {sc.mode!r} is not a torch.compile mode; use one of {', '.join(list_mode_options())}")
    if device == "cpu" and sc.dtype == "float16":
        parser.error("--dtype float16 on CPU: use float32 (or bfloat16)")
    return sc, a


def main(argv: list[str] | None = None) -> int:
    sc, a = parse(argv)
    cache_dir = None
    if not a.warm_cache:
        # Cold compile times: nothing from an earlier run (or an earlier test) may be served from Inductor's caches.
        cache_dir = tempfile.mkdtemp(prefix="fxcache_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    quiet_hf_logs()
    if sc.freezing:
        # torch.compile(options={"freezing": True}) alone does not freeze: Dynamo reads the global flag. fxcache
        # sets it around its own graphs' calls; the plain compiled U-Net needs it set here.
        import torch._inductor.config

        torch._inductor.config.freezing = True
    try:
        env = environment(sc)
        _log(f"{sc.name}: {MODELS[sc.model]} on {env['device_name']}")
        _log(f"torch {env['torch']}, triton {env['triton']}, {env['torch_threads']} CPU threads; Inductor cache "
             f"{'as usual' if cache_dir is None else 'fresh (cold compile times)'}")  # fmt: skip
        if sc.device == "cpu" and env["load_average_1min_at_start"] > 0.5:
            _log(f"warning: load average {env['load_average_1min_at_start']:.2f}: other processes are using the CPU, "
                 "so these timings will be noisy")  # fmt: skip
        start = time.perf_counter()
        _log("building the model and the pipeline")
        bench = Bench(sc)

        def checkpoint() -> None:
            rows = bench.rows()
            write_files(a.out, sc, env, bench, rows, check_targets(sc, rows), time.perf_counter() - start, chart=False)

        bench.checkpoint = checkpoint
        try:
            bench.run()
        except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: report what was measured
            bench.notes.append(
                f"interrupted after {time.perf_counter() - start:.0f} s; what was not measured by then is missing"
            )
            bench.log(bench.notes[-1])
            _set_unet(bench.pipe, bench.unet)
        total_s = time.perf_counter() - start
        env = {**environment(sc, bench), "load_average_1min_at_start": env["load_average_1min_at_start"]}
        rows = bench.rows()
        checks = check_targets(sc, rows)
        _log("")
        print(report(sc, env, bench, rows, checks, total_s))
        paths = write_files(a.out, sc, env, bench, rows, checks, total_s)
        print("\nwrote " + ", ".join(map(str, paths)), flush=True)
        return 1 if bench.errors else 0
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
