"""Compiled graphs (Inductor C++ on CPU): same numbers as the eager transform, one compile per graph.

Compiling on a 2-core CPU is slow, so these tests use the small plain U-Net; the diffusers UNet gets
one compiled generation.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import fxcache
from fxcache.compile import compile_options, own_cudagraphs, uses_cudagraphs
from tests import models

pytestmark = pytest.mark.compile

TIMESTEPS = [900.0, 800.0, 700.0, 600.0, 500.0]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _generations(cached: torch.nn.Module, x: torch.Tensor, n: int = 2) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for _ in range(n):
            outs += [cached(x, torch.full((x.shape[0],), t)).clone() for t in TIMESTEPS]
    return outs


@pytest.fixture
def no_recompiles():
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


class _CountingBackend:
    """A torch.compile backend that records every graph Dynamo hands it, then lets Inductor compile it."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor.compile_fx import compile_fx

        self.graphs.append(len(gm.graph.nodes))
        return compile_fx(gm, example_inputs)


def test_compiled_matches_eager_and_compiles_each_graph_once(no_recompiles) -> None:
    model = models.PlainUNet("cat").eval()
    x, _ = models.plain_inputs()
    eager = _generations(fxcache.transform(model, branch=0, interval=3), x)
    backend = _CountingBackend()
    cached = fxcache.transform(model, branch=0, interval=3, compile={"backend": backend})
    compiled = _generations(cached, x)
    assert len(backend.graphs) == 2, f"one full and one shallow graph, compiled once each; got {backend.graphs}"
    for i, (a, b) in enumerate(zip(compiled, eager, strict=True)):
        assert _rel_err(a, b) <= 1e-4, f"step {i}: compiled differs from eager by {_rel_err(a, b):.2e}"
    assert cached.fxcache_state.full_steps == 4 and cached.fxcache_state.shallow_steps == 6


def test_cache_buffer_is_static(no_recompiles) -> None:
    model = models.PlainUNet("add").eval()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=1, interval=2, compile=True)
    with torch.no_grad():
        cached(x, torch.full((2,), 900.0))
        (slot,) = cached.slots.values()
        buffer, ptr = slot.buffer, slot.buffer.data_ptr()
        written = buffer.clone()
        cached(x, torch.full((2,), 800.0))  # shallow: reads, does not write
        assert torch.equal(buffer, written)
        cached(x, torch.full((2,), 700.0))  # full: writes in place
    assert slot.buffer is buffer and buffer.data_ptr() == ptr, "the cache is one buffer, never reallocated"
    assert not torch.equal(buffer, written), "the full step writes the new deep feature into the same buffer"


def test_users_own_torch_compile(no_recompiles) -> None:
    model = models.PlainUNet("cat").eval()
    x, _ = models.plain_inputs()
    eager = _generations(fxcache.transform(model, branch=0, interval=3), x)
    backend = _CountingBackend()
    compiled = _generations(torch.compile(fxcache.transform(model, branch=0, interval=3), backend=backend), x)
    assert len(backend.graphs) == 2, f"Dynamo should see exactly the two graphs, saw {backend.graphs}"
    assert all(_rel_err(a, b) <= 1e-4 for a, b in zip(compiled, eager, strict=True))


@pytest.mark.slow
def test_compiled_pipeline_generation_close_to_eager(no_recompiles) -> None:
    pipe = models.sd_pipeline(unet=models.sd_unet(blocks=2))  # a small graph: Inductor on 2 cores is slow
    fxcache.enable(pipe, branch=0, interval=3)
    eager = models.generate(pipe, steps=6)
    fxcache.enable(pipe, branch=0, interval=3, compile=True)
    compiled = [models.generate(pipe, steps=6) for _ in range(2)]  # two generations, no recompiles
    fxcache.disable(pipe)
    for out in compiled:
        assert _rel_err(out, eager) <= 1e-4


def test_compile_option_validation() -> None:
    with pytest.raises(ValueError, match="compile='fastest' is not a torch.compile mode"):
        fxcache.transform(models.PlainUNet(), compile="fastest")
    with pytest.raises(ValueError, match="has keys torch.compile does not take: nonsense"):
        fxcache.transform(models.PlainUNet(), compile={"nonsense": 1})
    with pytest.raises(TypeError, match="compile must be"):
        fxcache.transform(models.PlainUNet(), compile=3)  # type: ignore[arg-type]


def test_default_modes_per_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_options(True, cpu) == {"fullgraph": True, "dynamic": False}
    assert compile_options(True, cuda)["mode"] == "reduce-overhead"
    assert uses_cudagraphs(compile_options(True, cuda), cuda) and not own_cudagraphs(True, cuda)
    own = {"cudagraphs": True}
    assert compile_options(own, cuda) == {"fullgraph": True, "dynamic": False}, "no trees under fxcache's own graphs"
    assert own_cudagraphs(own, cuda) and not uses_cudagraphs(compile_options(own, cuda), cuda)
    assert compile_options("max-autotune", cuda)["mode"] == "max-autotune"
    assert not uses_cudagraphs(compile_options("max-autotune-no-cudagraphs", cuda), cuda)
    assert compile_options({"mode": "reduce-overhead", "dynamic": False}, cpu) == {
        "mode": "reduce-overhead", "dynamic": False, "fullgraph": True,
    }  # fmt: skip
    assert compile_options(False, cuda) is None


def _ops(run: object) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        run()  # type: ignore[operator]
    return {e.key for e in prof.key_averages()}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="freezing's CPU kernels need oneDNN")
def test_freezing_option_takes_effect(no_recompiles) -> None:
    # torch.compile(options={"freezing": True}) alone does not freeze (Dynamo reads the global flag);
    # fxcache makes the option work: the convolutions run on pre-packed weights. Matching eager at every
    # step also shows the cache buffer was not frozen: the full steps at t=900 and t=600 write different
    # features, and the shallow steps after each must read the latest.
    model = models.PlainUNet("cat").eval()
    x, _ = models.plain_inputs()
    eager = _generations(fxcache.transform(model, branch=0, interval=3), x)
    cached = fxcache.transform(model, branch=0, interval=3, compile={"options": {"freezing": True}})
    frozen = _generations(cached, x)
    for i, (a, b) in enumerate(zip(frozen, eager, strict=True)):
        assert _rel_err(a, b) <= 1e-4, f"step {i}: frozen differs from eager by {_rel_err(a, b):.2e}"
    with torch.no_grad():
        ops = _ops(lambda: cached(x, torch.full((2,), 900.0)))
    assert "mkldnn::_convolution_pointwise" in ops and "aten::mkldnn_convolution" not in ops, sorted(ops)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="freezing's CPU kernels need oneDNN")
def test_frozen_weights_follow_in_place_updates_at_the_next_generation() -> None:
    model = models.PlainUNet("cat").eval()
    x, t = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=3, compile={"options": {"freezing": True}})
    with torch.no_grad():
        before = cached(x, t).clone()
        model.head.bias.add_(1.0)  # an in-place weight update, as loading new weights does
        cached.reset()
        after = cached(x, t)  # a new generation: the version counters moved, so the graphs are rebuilt
        model.head.bias.sub_(1.0)
    assert torch.allclose(after, before + 1.0, atol=1e-5), "frozen graphs are compiled again with the new weights"


def test_compile_spec_cudagraphs_key() -> None:
    from fxcache.compile import check_compile_spec

    check_compile_spec({"mode": "max-autotune-no-cudagraphs", "cudagraphs": True})
    assert own_cudagraphs({"cudagraphs": True}, torch.device("cuda"))
    assert not own_cudagraphs({"cudagraphs": True}, torch.device("cpu")), "CUDA graphs only on CUDA"
    with pytest.raises(ValueError, match="CUDA graphs twice"):
        check_compile_spec({"mode": "reduce-overhead", "cudagraphs": True})


@pytest.mark.gpu
def test_cudagraph_outputs_are_the_callers_own() -> None:
    # Under reduce-overhead the next replay overwrites a CUDA graph's outputs; the runtime clones them.
    model = models.PlainUNet("cat").eval().cuda()
    x, _ = models.plain_inputs()
    x = x.cuda()
    cached = fxcache.transform(model, branch=0, interval=2, compile=True)
    with torch.no_grad():
        outs = [cached(x, torch.full((2,), t, device="cuda")) for t in (900.0, 800.0, 700.0, 600.0)]
        kept = [o.clone() for o in outs]
        cached(x, torch.full((2,), 500.0, device="cuda"))  # one more replay of each graph
    assert all(torch.equal(o, k) for o, k in zip(outs, kept, strict=True)), "an earlier output was overwritten"
    assert not torch.equal(outs[0], outs[2]), "different timesteps give different outputs"
