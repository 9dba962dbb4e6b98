"""GPU checks for the compiled path; skipped without CUDA (CI is CPU-only).

Run on a GPU machine by benchmarks/gpu_check.sh: ``pytest -m gpu tests``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fxcache
from tests import models

pytestmark = [pytest.mark.gpu, pytest.mark.compile]


def _psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    mse = (ref.float() - x.float()).pow(2).mean().item()
    peak = (ref.float().max() - ref.float().min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _cuda_pipe(dtype: torch.dtype = torch.float16):
    pipe = models.sd_pipeline()
    return pipe.to("cuda", dtype)


def _generate(pipe, steps: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    dtype = pipe.unet.dtype
    emb = torch.randn(1, 7, models.CROSS_DIM, generator=g).to("cuda", dtype)
    neg = torch.randn(1, 7, models.CROSS_DIM, generator=g).to("cuda", dtype)
    return pipe(
        prompt_embeds=emb, negative_prompt_embeds=neg, height=16, width=16, num_inference_steps=steps,
        output_type="latent", generator=torch.Generator("cuda").manual_seed(0),
    ).images  # fmt: skip


def test_cudagraphs_are_not_skipped_and_nothing_recompiles() -> None:
    pipe = _cuda_pipe()
    counters.clear()
    fxcache.enable(pipe, branch=0, interval=3, compile=True)  # reduce-overhead on CUDA
    with torch._dynamo.config.patch(error_on_recompile=True):
        first, second = _generate(pipe), _generate(pipe)
    fxcache.disable(pipe)
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    assert skips == 0, f"{skips} graph(s) fell back from CUDA graphs; see the 'skipping cudagraphs' log"
    assert torch.equal(first, second), "two generations from the same seed must agree"


def test_no_host_sync_per_step() -> None:
    pipe = _cuda_pipe()
    fxcache.enable(pipe, branch=0, interval=3, compile=True)
    _generate(pipe)  # warm-up: capture, compile, CUDA graph recording
    unet = pipe.unet
    pipe.scheduler.set_timesteps(8, device="cuda")
    sample = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    emb = torch.randn(2, 7, models.CROSS_DIM, device="cuda", dtype=torch.float16)
    ts = list(pipe.scheduler.timesteps)  # the 0-d device tensors a pipeline passes; listing them syncs once
    unet(sample, ts[0], encoder_hidden_states=emb, return_dict=False)  # a new generation reads the timesteps once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ts[1:]:  # the hot path: full and shallow steps, no host-device synchronisation
            unet(sample, t, encoder_hidden_states=emb, return_dict=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    fxcache.disable(pipe)
    assert unet.fxcache_state.shallow_steps > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_matches_eager_psnr(dtype: torch.dtype) -> None:
    pipe = _cuda_pipe(dtype)
    fxcache.enable(pipe, branch=1, interval=2)
    eager = _generate(pipe)
    fxcache.enable(pipe, branch=1, interval=2, compile=True)
    compiled = _generate(pipe)
    fxcache.disable(pipe)
    assert _psnr(eager, compiled) >= 40.0, f"PSNR {_psnr(eager, compiled):.1f} dB against the eager transform"


def test_compiled_fp32_matches_eager() -> None:
    pipe = _cuda_pipe(torch.float32)
    fxcache.enable(pipe, branch=0, interval=3)
    eager = _generate(pipe)
    fxcache.enable(pipe, branch=0, interval=3, compile=True)
    compiled = _generate(pipe)
    fxcache.disable(pipe)
    rel = ((compiled - eager).norm() / eager.norm()).item()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
