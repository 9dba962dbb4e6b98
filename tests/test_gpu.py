"""GPU checks for the compiled path (CUDA graphs); skipped without CUDA (CI is CPU-only).

Run on a GPU machine by ``bash benchmarks/gpu_check.sh`` after its benchmark, under a deadline: the models are
small (a 2-block SD U-Net of ~590 graph nodes, and the hand-written PlainUNet), one compiled pipeline is shared by
the pipeline tests, and the most important checks come first.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fxcache
from fxcache.metrics import psnr
from tests import models

pytestmark = [pytest.mark.gpu, pytest.mark.compile]

STEPS = 6
FP16 = torch.float16


def _generate(pipe, steps: int = STEPS, **extra) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(1, 7, models.CROSS_DIM, generator=g).to("cuda", FP16)
    neg = torch.randn(1, 7, models.CROSS_DIM, generator=g).to("cuda", FP16)
    with torch.no_grad():
        return pipe(
            prompt_embeds=emb, negative_prompt_embeds=neg, height=16, width=16, num_inference_steps=steps,
            output_type="latent", generator=torch.Generator("cuda").manual_seed(0), **extra,
        ).images  # fmt: skip


@pytest.fixture(scope="module", params=[True, {"cudagraphs": True}], ids=["cudagraph-trees", "own-cudagraphs"])
def compiled_pipe(request):
    """A small fp16 SD pipeline with fxcache compiled, warmed up; the U-Net call the pipeline made.

    ``compile=True`` uses Inductor's CUDA graph trees; ``{"cudagraphs": True}`` records fxcache's own CUDA graphs.
    """
    pipe = models.sd_pipeline(models.sd_unet(layers_per_block=1, blocks=2)).to("cuda", FP16)
    fxcache.enable(pipe, branch=0, interval=3, compile=request.param)
    calls: list[tuple[tuple, dict]] = []  # recorded on the module the pipeline calls, not inside the capture
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    counters.clear()
    _generate(pipe)  # captures, compiles and records both graphs
    hook.remove()
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    yield pipe, calls[0], skips
    fxcache.disable(pipe)
    torch.compiler.reset()


@pytest.fixture(autouse=True)
def _isolate() -> None:  # overrides conftest's: the module's compiled pipeline must survive between tests
    torch.manual_seed(0)


def test_cudagraphs_are_not_skipped_and_nothing_recompiles(compiled_pipe) -> None:
    pipe, _, skips = compiled_pipe
    assert skips == 0, f"{skips} graph(s) fell back from CUDA graphs; see the 'skipping cudagraphs' log"
    with torch._dynamo.config.patch(error_on_recompile=True):
        first, second = _generate(pipe).clone(), _generate(pipe)
    assert torch.equal(first, second), "two generations from the same seed must agree"
    assert pipe.unet.fxcache_state.shallow_steps > 0


def test_no_host_sync_per_step(compiled_pipe) -> None:
    pipe, (args, kwargs), _ = compiled_pipe
    unet = pipe.unet
    pipe.scheduler.set_timesteps(STEPS, device="cuda")
    ts = pipe.scheduler.timesteps
    with torch.no_grad():  # as the pipeline calls it, with the arguments it passed
        unet(args[0], ts[0], **kwargs)  # a new generation reads the scheduler's timesteps once (one sync)
        torch.cuda.synchronize()
        before = unet.fxcache_state.shallow_steps
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(1, STEPS):  # full and shallow steps: no host-device synchronisation
                unet(args[0], ts[i], **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert unet.fxcache_state.shallow_steps > before, "the window must contain shallow steps"


def test_outputs_survive_the_next_step(compiled_pipe) -> None:
    # A CUDA graph's outputs are overwritten by its next replay; a caller that keeps an output (PNDM without CFG
    # keeps its past noise predictions) must still read what it was given.
    pipe, (args, kwargs), _ = compiled_pipe
    pipe.scheduler.set_timesteps(STEPS, device="cuda")
    ts = pipe.scheduler.timesteps
    with torch.no_grad():
        outs = [pipe.unet(args[0], ts[i], **kwargs)[0] for i in range(4)]  # full, shallow x2, full (return_dict=False)
        copies = [o.clone() for o in outs]
        pipe.unet(args[0], ts[4], **kwargs)
    for i, (o, c) in enumerate(zip(outs, copies, strict=True)):
        assert torch.equal(o, c), f"output of step {i} changed after later steps ran"


def test_compiled_fp16_matches_eager_psnr(compiled_pipe) -> None:
    pipe, _, _ = compiled_pipe
    compiled = _generate(pipe).clone()
    twin = models.sd_pipeline(pipe.unet.model)  # a second pipeline around the same (fp16, CUDA) U-Net
    twin.vae.to("cuda", FP16)
    eager = _generate(fxcache.enable(twin, branch=0, interval=3))
    db = psnr(eager.float(), compiled.float(), data_range=float(eager.max() - eager.min()))
    assert db >= 35.0, f"PSNR {db:.1f} dB of compiled fp16 against the eager transform"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_unet_compiled_matches_eager(dtype: torch.dtype) -> None:
    torch.compiler.reset()
    model = models.PlainUNet("cat").eval().to("cuda", dtype)
    x = models.plain_inputs()[0].to("cuda", dtype)
    ts = [torch.full((2,), t, device="cuda") for t in (900.0, 800.0, 700.0, 600.0, 500.0)]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    try:
        with torch.no_grad():
            eager_mod = fxcache.transform(model, branch=1, interval=2)
            eager = torch.cat([eager_mod(x, t) for t in ts])
            compiled_mod = fxcache.transform(model, branch=1, interval=2, compile=True)
            compiled = torch.cat([compiled_mod(x, t) for t in ts])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if dtype == torch.float32:
        rel = ((compiled - eager).float().norm() / eager.float().norm()).item()
        assert rel <= 1e-4, f"relative error {rel:.2e} in fp32 with TF32 off"
    else:
        db = psnr(eager.float(), compiled.float(), data_range=float(eager.max() - eager.min()))
        assert db >= 30.0, f"PSNR {db:.1f} dB in bf16"


@pytest.mark.parametrize("spec", [True, {"cudagraphs": True}], ids=["cudagraph-trees", "own-cudagraphs"])
def test_two_threads_share_a_compiled_module(spec) -> None:
    """Two threads interleaving steps on one compiled module get what each gets alone (per-request state)."""
    import threading

    torch.compiler.reset()
    model = models.PlainUNet("cat").eval().to("cuda", FP16)
    cached = fxcache.transform(model, branch=1, interval=3, compile=spec)
    ts = [torch.full((2,), t, device="cuda") for t in (900.0, 800.0, 700.0, 600.0, 500.0, 400.0)]
    seeds = [1, 2]

    def denoise(seed: int, between=lambda: None) -> torch.Tensor:
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to("cuda", FP16)
        with torch.no_grad():
            for t in ts:
                x = x - 0.1 * cached(x, t)
                between()
        torch.cuda.synchronize()
        return x

    solo = [denoise(s) for s in seeds]
    barrier, got = threading.Barrier(2), [None, None]

    def work(i: int) -> None:
        got[i] = denoise(seeds[i], lambda: barrier.wait(timeout=120))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, solo, strict=True):
        assert a is not None, "a thread failed (see its traceback above)"
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= 1e-2, f"max abs difference {diff:.3g} from the solo run (state shared between threads?)"
