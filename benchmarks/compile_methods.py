"""The compile benchmark's methods and measurements: each method set up on one pipeline, then measured in
interleaved rounds (``python -m benchmarks.compile``)."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import fxcache
from benchmarks.common import Memory, call_seconds, log, sync
from benchmarks.compile_scenario import (
    FX_COMPILED,
    FX_EAGER,
    HELPER,
    PLAIN_COMPILED,
    PLAIN_EAGER,
    SCHEDULES,
    Scenario,
    build_unet,
    counts,
    full_step_indices,
)
from fxcache.adapters.diffusers import branch_from_deepcache_id, swap_unet
from fxcache.compile import uses_cudagraphs
from fxcache.demo.sd15 import random_prompt_embeds, sd_pipeline

Use = Callable[[int], AbstractContextManager[Any]]  # runs the pipeline with a method at interval N, for a block


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


class MarkStep(torch.nn.Module):
    """A U-Net compiled with CUDA graphs, each call marked as a new iteration, as fxcache marks its own steps.

    Without ``torch.compiler.cudagraph_mark_step_begin()`` before each call, CUDA graph trees cannot tell
    that the previous step's outputs are dead and record new graphs in later generations. Attributes the
    pipeline reads (``config``, ``dtype``, ...) come from the wrapped module.
    """

    def __init__(self, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "compiled":
                raise
        return getattr(self.compiled, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs)


@dataclass
class Engine:
    """One method in one configuration: set up once (warm-up, capture, compile), then measured in rounds."""

    method: str
    branch: int | None
    intervals: tuple[int, ...]  # (1,) for the plain model
    use: Use  # with use(N): the pipeline runs this method at interval N; the plain U-Net is back afterwards
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
    gen_steps: dict[int, list[list[float]]] = field(default_factory=dict)  # N -> step timestamps of generations
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
        self.memory = Memory(self.device)
        self.peak_resets = self.memory.peak_resets
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
        log(f"[{self.elapsed():6.1f} s] {msg}")

    def sync(self) -> None:
        sync(self.device)

    def save(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint()

    def generate(self, steps: int, stamps: list[float] | None = None) -> torch.Tensor:
        """One pipeline call; with ``stamps``, the time after each step (device synced) is appended to it."""
        sc = self.sc
        extra: dict[str, Any] = {}
        if stamps is not None:

            def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                self.sync()
                stamps.append(time.perf_counter())
                return kwargs

            extra["callback_on_step_end"] = on_step_end
        return self.pipe(
            prompt_embeds=self.emb, negative_prompt_embeds=self.neg, height=sc.latent, width=sc.latent,
            num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(sc.seed), **extra,
        ).images  # fmt: skip

    def generation_seconds(self, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        self.generate(steps)
        self.sync()
        return time.perf_counter() - start

    def memory_mib(self) -> float:
        """Memory in use now: allocated by PyTorch's CUDA allocator, or the process's resident set."""
        return self.memory.now_mib()

    def timed_generation(self, stamps: list[float] | None = None) -> tuple[torch.Tensor, float, float, float]:
        """(latents, seconds, peak MiB, peak MiB over the start) of one full-length generation."""
        self.sync()
        self.memory.reset_peak()
        base = self.memory_mib()
        start = time.perf_counter()
        latents = self.generate(self.sc.steps, stamps)
        self.sync()
        seconds = time.perf_counter() - start
        peak = self.memory.peak_mib()
        return latents.detach().float().cpu(), seconds, peak, peak - base

    def call_seconds(self, call: Callable[[], Any]) -> float:
        """Mean seconds of ``call()`` over ``step_reps`` calls between two syncs, after warm-up calls."""
        with torch.no_grad():  # CUDA graph trees: warm up, record, replay
            return call_seconds(call, self.sc.step_reps, warmup=3 if self.cuda else 1, device=self.device)

    def step_args(self, timestep: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        assert self.call is not None, "plain eager is set up first and records the pipeline's U-Net call"
        args, kwargs = self.call
        if timestep is not None:
            args = (args[0], timestep, *args[2:])
        return args, kwargs

    def warm_up(self, eng: Engine, steps: int, interval: int, what: str) -> Engine:
        self.log(f"{eng.label}: warm-up generation ({steps} steps at N={interval}; {what})")
        with eng.use(interval):
            eng.warmup_s = self.generation_seconds(steps)
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

        eng = Engine(PLAIN_EAGER, None, (1,), lambda n: swap_unet(pipe, unet), steps)
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
        compiled: torch.nn.Module = torch.compile(unet, fullgraph=True, dynamic=False, **sc.compile_kwargs)
        if uses_cudagraphs(sc.compile_kwargs, self.device):
            compiled = MarkStep(compiled)  # each U-Net call is one iteration, in generations and step timings alike

        def steps() -> tuple[float, None]:
            args, kwargs = self.step_args()
            return self.call_seconds(lambda: compiled(*args, **kwargs)), None

        eng = Engine(PLAIN_COMPILED, None, (1,), lambda n: swap_unet(pipe, compiled), steps)
        return self.warm_up(eng, min(sc.steps, 3), 1, f"compiles, {sc.compile_label}")

    def fxcache(self, branch: int, compiled: bool) -> Engine:
        """One fxcache.enable per branch; its graphs serve every N (only the schedule changes)."""
        sc, pipe = self.sc, self.pipe
        first = sc.intervals[0]
        fxcache.enable(pipe, branch=branch, interval=first, compile=sc.compile_kwargs if compiled else False)
        cached = pipe.unet  # the CachedModule enable made, numbering steps as the pipeline does
        fxcache.disable(pipe)

        def use(n: int) -> AbstractContextManager[Any]:
            cached.configure(interval=n, schedule=None)  # the graphs are kept: only the schedule changes
            return swap_unet(pipe, cached)  # what fxcache.enable did, with this module and its graphs

        def steps() -> tuple[float, float]:
            args, kwargs = self.step_args()
            source = cached.step_source
            # step 0 full, step 1 shallow: the uniform schedule (a variant's may need the total number of steps)
            cached.configure(interval=first, schedule=None)
            try:
                cached.step_source = _fixed_step(0)  # step 0 of the generation: full
                full = self.call_seconds(lambda: cached(*args, **kwargs))
                cached.step_source = _fixed_step(1)  # step 1 (N >= 2): shallow, reading the cache just written
                shallow = self.call_seconds(lambda: cached(*args, **kwargs))
            finally:
                cached.step_source = source
                cached.reset()
            return full, shallow

        eng = Engine(FX_COMPILED if compiled else FX_EAGER, branch, sc.intervals, use, steps,
                     counters=cached.fxcache_state, module=cached)  # fmt: skip
        what = "captures and compiles the full and shallow graphs" if compiled else "captures"
        return self.warm_up(eng, min(sc.steps, first + 2), first, what)  # 2 full and >= 2 shallow steps

    def schedule_variant(self, base: Engine, kind: str) -> Engine:
        """``base`` (an fxcache engine) on another schedule: the same module and graphs, so no setup of its own."""
        cached, pipe, steps = base.module, self.pipe, self.sc.steps

        def use(n: int) -> AbstractContextManager[Any]:
            cached.configure(interval=None, schedule=SCHEDULES[kind](n, steps))
            return swap_unet(pipe, cached)

        return Engine(f"{base.method} {kind}", base.branch, base.intervals, use, base.step_times,
                      counters=base.counters, kind=kind, module=cached)  # fmt: skip

    def helper(self, branch: int) -> Engine:
        from DeepCache import DeepCacheSDHelper

        sc, unet, pipe = self.sc, self.unet, self.pipe
        cid = _deepcache_id(unet, branch)

        @contextmanager
        def use(n: int) -> Iterator[None]:
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=n, cache_branch_id=cid)
            helper.enable()
            try:
                yield
            finally:
                helper.disable()
                _drop_restored_forwards(unet)

        def steps() -> tuple[float, float]:
            # The helper numbers a call by its timestep's index in scheduler.timesteps, here the last generation's
            # (a full-length one): index 0 runs in full, index 1 shallow.
            timesteps = pipe.scheduler.timesteps
            full_args, kwargs = self.step_args(timesteps[0])
            shallow_args, _ = self.step_args(timesteps[1])
            with use(sc.intervals[0]):
                full = self.call_seconds(lambda: pipe.unet(*full_args, **kwargs))
                shallow = self.call_seconds(lambda: pipe.unet(*shallow_args, **kwargs))
            return full, shallow

        eng = Engine(HELPER, branch, sc.intervals, use, steps)
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
        # Step timestamps inside the generation: on CPU from the timed generation itself (a sync is a no-op there);
        # on CUDA a sync per step would change the timed generation, so an extra one, once per method and N.
        stamps: list[float] | None = [] if not self.cuda else None
        with eng.use(n):
            latents, seconds, peak, working = self.timed_generation(stamps)
        ran = None if before is None else (st.full_steps - before[0], st.shallow_steps - before[1])
        if self.cuda and n not in eng.gen_steps:
            stamps = []
            with eng.use(n):
                self.generate(self.sc.steps, stamps)
        if stamps is not None:
            eng.gen_steps.setdefault(n, []).append(stamps)
        eng.gens.setdefault(n, []).append(seconds)
        eng.peaks[n] = max(eng.peaks.get(n, 0.0), peak)
        eng.working[n] = max(eng.working.get(n, 0.0), working)
        eng.latents.setdefault(n, latents)
        if ran is not None and ran != counts(n, self.sc.steps, eng.kind):
            self.notes.append(f"{eng.label} N={n}: ran {ran[0]}+{ran[1]} full+shallow steps, expected "
                              f"{counts(n, self.sc.steps, eng.kind)}")  # fmt: skip

    def step_times_in_generation(self, eng: Engine, n: int) -> tuple[float | None, float | None]:
        """Median (full, shallow) step seconds inside this method's generations at N, step 0 left out."""
        full_at = full_step_indices(n, self.sc.steps, eng.kind)
        full: list[float] = []
        shallow: list[float] = []
        for stamps in eng.gen_steps.get(n, []):
            for i in range(1, len(stamps)):
                (full if i in full_at else shallow).append(stamps[i] - stamps[i - 1])
        return (statistics.median(full) if full else None), (statistics.median(shallow) if shallow else None)
