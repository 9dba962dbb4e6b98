"""Per-request state: threads, asyncio tasks and explicit generations sharing one module get their solo results.

Weights, plans and compiled graphs are shared; the step state and the cached feature belong to a generation
(a thread's own, or one entered with ``cached.generation()``). Every comparison here is bit for bit.
"""

from __future__ import annotations

import asyncio
import copy
import contextlib
import gc
import threading
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo

import fxcache
from fxcache.generations import CacheState
from tests import models

TIMESTEPS = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0, 0.0]


def _inputs(seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _denoise(cached: torch.nn.Module, x: torch.Tensor, between: Callable[[], None] = lambda: None) -> torch.Tensor:
    """A 10-step generation whose input depends on the previous output (as a sampler's does)."""
    with torch.no_grad():
        for t in TIMESTEPS:
            x = x - 0.1 * cached(x, torch.full((x.shape[0],), t))
            between()
    return x


def _solo(model: torch.nn.Module, seeds: list[int], **settings) -> list[torch.Tensor]:
    return [_denoise(fxcache.transform(model, **settings), _inputs(s)) for s in seeds]


def _in_threads(cached: torch.nn.Module, seeds: list[int]) -> list[torch.Tensor]:
    barrier = threading.Barrier(len(seeds))  # every thread runs step k before any runs step k + 1
    results: list[torch.Tensor | BaseException | None] = [None] * len(seeds)

    def work(i: int) -> None:
        try:
            results[i] = _denoise(cached, _inputs(seeds[i]), lambda: barrier.wait(timeout=300))
        except BaseException as exc:  # reported by the main thread
            barrier.abort()
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))  # the cause first
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def _assert_all_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"generation {i}: max abs difference {(g - w).abs().max().item():.3g}"


@pytest.mark.parametrize("branch", [0, 1])
def test_threads_sharing_a_module_get_their_solo_results(branch: int) -> None:
    model, seeds = models.PlainUNet("cat").eval(), [1, 2, 3, 4]
    solo = _solo(model, seeds, branch=branch, interval=3)
    cached = fxcache.transform(model, branch=branch, interval=3)
    _assert_all_equal(_in_threads(cached, seeds), solo)
    assert len(cached.plans) == 1, "one capture serves every thread"
    assert cached.fxcache_state.full_steps == 0, "the main thread's own state was not touched"


@pytest.mark.compile
def test_threads_sharing_a_compiled_module_get_their_solo_results_without_recompiles() -> None:
    model, seeds = models.PlainUNet("cat").eval(), [1, 2]
    cached = fxcache.transform(model, branch=1, interval=3, compile=True)
    solo = [_denoise(cached, _inputs(s)) for s in seeds]  # one after the other, on the same graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        _assert_all_equal(_in_threads(cached, seeds), solo)
        _assert_all_equal(_in_threads(cached, seeds[::-1]), solo[::-1])


def test_asyncio_tasks_interleaving_steps_get_their_solo_results() -> None:
    model, seeds = models.PlainUNet("cat").eval(), [1, 2, 3]
    solo = _solo(model, seeds, branch=0, interval=4)
    cached = fxcache.transform(model, branch=0, interval=4)

    async def one(seed: int) -> torch.Tensor:
        x = _inputs(seed)
        with cached.generation(), torch.no_grad():  # entered in this task's context only
            for t in TIMESTEPS:
                x = x - 0.1 * cached(x, torch.full((2,), t))
                await asyncio.sleep(0)  # let the other tasks run a step
        return x

    async def all_of_them() -> list[torch.Tensor]:
        return list(await asyncio.gather(*(one(s) for s in seeds)))

    _assert_all_equal(asyncio.run(all_of_them()), solo)


def test_a_kept_generation_is_reentered_call_by_call() -> None:
    # Classifier-free guidance as two calls per step: one generation per branch, entered for each call.
    model = models.PlainUNet("add").eval()
    solo_cond, solo_uncond = _solo(model, [1, 2], branch=0, interval=3)
    cached = fxcache.transform(model, branch=0, interval=3)
    cond, uncond = cached.generation(), cached.generation()
    xc, xu = _inputs(1), _inputs(2)
    with torch.no_grad():
        for t in TIMESTEPS:
            tt = torch.full((2,), t)
            with cond:
                xc = xc - 0.1 * cached(xc, tt)
            with uncond:
                xu = xu - 0.1 * cached(xu, tt)
    _assert_all_equal([xc, xu], [solo_cond, solo_uncond])
    assert (cond.state.generation_full_steps, cond.state.generation_shallow_steps) == (4, 6)
    assert cached.fxcache_state.full_steps == 0, "outside the blocks, the thread's own state is untouched"


def test_leaving_a_generation_frees_its_cache() -> None:
    model = models.PlainUNet("cat").eval()
    cached = fxcache.transform(model, branch=0, interval=3)
    with torch.no_grad():
        with cached.generation() as first:
            cached(_inputs(1), torch.tensor(900.0))
        first_state = weakref.ref(first.state)
        with cached.generation():  # takes the slot: the first generation's feature is copied out
            assert first.state.saved is None
            cached(_inputs(2), torch.tensor(900.0))
            assert first.state.saved is not None and first.state.saved_current
        saved = weakref.ref(first.state.saved)
        del first
        gc.collect()
        assert first_state() is None and saved() is None, "a dropped generation leaves nothing behind"
        kept = cached.generation()
        with kept:
            cached(_inputs(3), torch.tensor(900.0))
        kept.close()
    assert kept.state.saved is None and kept.state.step == -1


def test_an_exception_in_a_generation_leaves_the_next_one_exact() -> None:
    pipe = models.sd_pipeline(scheduler=models.ddim())
    fxcache.enable(pipe, branch=0, interval=3)
    reference = models.generate(pipe, steps=8)

    def fail_at_step_4(pipe_, step, timestep, callback_kwargs):
        if step == 4:
            raise RuntimeError("a callback failed")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="a callback failed"):
        models.generate(pipe, steps=8, callback_on_step_end=fail_at_step_4)
    assert torch.equal(models.generate(pipe, steps=8), reference)


def test_an_exception_inside_a_generation_block_leaves_other_generations_exact() -> None:
    model = models.PlainUNet("cat").eval()
    (solo,) = _solo(model, [1], branch=0, interval=3)
    cached = fxcache.transform(model, branch=0, interval=3)
    kept = cached.generation()
    x = _inputs(1)
    with torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            with kept:
                x = x - 0.1 * cached(x, torch.full((2,), t))
            if i == 2:  # another generation fails half way through, after taking the slot
                with pytest.raises(ValueError, match="boom"), cached.generation():
                    cached(_inputs(9), torch.full((2,), 900.0))
                    raise ValueError("boom")
    assert torch.equal(x, solo)


def test_the_plan_limit_evicts_and_recaptures_with_exact_results() -> None:
    model = models.PlainUNet("cat").eval()
    sizes = [8, 16, 24]
    solo = [_denoise(fxcache.transform(model, branch=0, interval=3), _inputs(1, s)) for s in sizes]
    cached = fxcache.transform(model, branch=0, interval=3, max_plans=2)
    generations = [cached.generation() for _ in sizes]
    xs = [_inputs(1, s) for s in sizes]
    with torch.no_grad():
        for t in TIMESTEPS:  # three shapes, two plans kept: every step of every generation evicts one
            for i, g in enumerate(generations):
                with g:
                    xs[i] = xs[i] - 0.1 * cached(xs[i], torch.full((2,), t))
            assert len(cached._entries) <= 2 and len(cached.plans) <= 2
    _assert_all_equal(xs, solo)
    assert [g.state.generation_full_steps for g in generations] == [4, 4, 4], "eviction forced no extra full step"
    cached.drop_graphs()
    assert len(cached.plans) == 0 and len(cached._entries) == 0


@pytest.fixture
def one_intra_op_thread() -> Iterator[None]:
    # Eight Python threads each running torch's intra-op threads on a small CPU mostly wait on each other
    # (on 2 cores the stress test below takes 47 s with 2 intra-op threads, 18 s with 1).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_intra_op_thread")
def test_eight_threads_eight_shapes_two_plans_get_their_solo_results(monkeypatch: pytest.MonkeyPatch) -> None:
    # Eight threads, each running 16 generations of 10 steps on its own input shape, share a module that keeps
    # two programs: plans are evicted and captured again under running generations, all the time.
    model = models.TinyUNet().eval()
    shapes = [(batch, size) for batch in (1, 2) for size in (4, 6, 8, 10)]
    generations = 16

    def run(cached: torch.nn.Module, i: int) -> list[tuple[torch.Tensor, int, int]]:
        batch, size = shapes[i]
        seeds = torch.Generator().manual_seed(i)
        results = []
        for g in range(generations):
            x = torch.randn(batch, 3, size, size, generator=seeds)
            generation = cached.generation() if i % 2 else contextlib.nullcontext()  # half on the thread's state
            with generation:
                x = _denoise(cached, x)
                st = cached.fxcache_state
                results.append((x, st.generation_full_steps, st.generation_shallow_steps))
        return results

    # The solo runs on a copy (same weights): programs are kept per model object across modules
    # (fxcache.kept_programs), and the shared module below must build and evict its own.
    solo_module = fxcache.transform(copy.deepcopy(model), branch=0, interval=3)
    solo = [run(solo_module, i) for i in range(len(shapes))]
    captures: list[tuple] = []

    def counted_plan(*args, **kwargs):
        captures.append(args)
        return fxcache.plan(*args, **kwargs)

    monkeypatch.setattr("fxcache.runtime.plan", counted_plan)
    cached = fxcache.transform(model, branch=0, interval=3, max_plans=2)
    results: list[list[tuple[torch.Tensor, int, int]] | BaseException | None] = [None] * len(shapes)

    def work(i: int) -> None:
        try:
            results[i] = run(cached, i)
        except BaseException as exc:  # reported by the main thread
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shapes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    for i, (got, want) in enumerate(zip(results, solo, strict=True)):
        assert got is not None and not isinstance(got, BaseException)
        for g, ((x, full, shallow), (x_solo, full_solo, shallow_solo)) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(x, x_solo), f"thread {i} ({shapes[i]}), generation {g}: differs from its solo run"
            assert (full, shallow) == (full_solo, shallow_solo) == (4, 6), f"thread {i}, generation {g}: steps"
    assert len(cached._entries) <= 2 and len(cached.plans) <= 2, "at most max_plans programs are kept"
    assert len(captures) > len(shapes), "plans were evicted and captured again while the threads ran"


def test_max_plans_is_validated_and_configurable() -> None:
    with pytest.raises(ValueError, match="max_plans=0 is invalid"):
        fxcache.transform(torch.nn.Identity(), max_plans=0)
    model = models.PlainUNet("cat").eval()
    cached = fxcache.transform(model, branch=0, interval=3, max_plans=3)
    with torch.no_grad():
        for size in (8, 16, 24):
            cached(_inputs(1, size), torch.tensor(900.0))
    assert len(cached.plans) == 3
    cached.configure(max_plans=1)
    assert len(cached.plans) == 1 and cached.cache_config.max_plans == 1


def test_a_copy_starts_with_fresh_generation_state() -> None:
    import copy

    cached = fxcache.transform(models.PlainUNet("cat").eval(), branch=0, interval=3)
    with torch.no_grad():
        cached(_inputs(1), torch.tensor(900.0))
    clone = copy.deepcopy(cached)
    assert isinstance(clone.fxcache_state, CacheState) and clone.fxcache_state.step == -1
    assert len(clone.plans) == 0 and cached.fxcache_state.step == 0


def test_a_dropped_plan_takes_its_fx_sources_with_it() -> None:
    # torch.fx caches every GraphModule's source for good; without this a server capturing new shapes grows.
    from torch.fx.graph_module import _loader

    cached = fxcache.transform(models.PlainUNet("cat").eval(), branch=0, interval=3, max_plans=1)
    with torch.no_grad():
        cached(_inputs(1, 8), torch.tensor(900.0))
        (first,) = cached.plans.values()
        assert first.fx_sources and all(k in _loader.eval_cache for k in first.fx_sources)
        cached(_inputs(1, 16), torch.tensor(900.0))  # evicts the first plan
    assert not any(k in _loader.eval_cache for k in first.fx_sources)
    (second,) = cached.plans.values()
    assert all(k in _loader.eval_cache for k in second.fx_sources)
    cached.drop_graphs()
    assert not any(k in _loader.eval_cache for k in second.fx_sources)
