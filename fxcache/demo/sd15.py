"""``python -m fxcache sd15``: DeepCache on the Stable Diffusion 1.5 U-Net architecture, offline, in a few minutes.

No weights can be downloaded, so the models are built from their configs with random weights: the
"images" are noise, and only two things mean something: how much faster the cached generation is,
and how closely its latents agree with the uncached ones.

The builders here (:func:`sd15_unet`, :func:`tiny_vae`, :func:`sd_pipeline`) are shared with
``benchmarks/`` and the tests. diffusers is imported inside them only, so importing this module stays free
of it (and ``import fxcache`` never imports this module).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:  # annotations only: importing fxcache.demo.sd15 must not import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

__all__ = ["SD15_UNET_CONFIG", "main", "quiet_hf_logs", "random_prompt_embeds", "sd15_unet", "sd_pipeline", "tiny_vae"]

_T = TypeVar("_T")

# Stable Diffusion 1.5's U-Net (runwayml/stable-diffusion-v1-5, unet/config.json), minus the weights.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_TEXT_TOKENS, SD15_TEXT_DIM = 77, 768  # CLIP ViT-L/14: what the U-Net cross-attends to
LATENT_FACTOR = 8  # SD's VAE maps 8x8 pixels to one latent; the demo's pixel sizes assume that VAE


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """The Stable Diffusion 1.5 U-Net architecture (860M parameters) with random weights, fp32, eval mode.

    Example:
        >>> unet = sd15_unet()                       # doctest: +SKIP
        >>> sum(p.numel() for p in unet.parameters())  # doctest: +SKIP
        859520964
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval()  # fp32: torch's default dtype


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A one-block AutoencoderKL with 4 latent channels and scale factor 1 (height/width = latent size).

    The demo returns latents, so the VAE is never run; the pipeline only needs one to exist.

    Example:
        >>> tiny_vae().config.latent_channels  # doctest: +SKIP
        4
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def sd_pipeline(unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """An offline StableDiffusionPipeline around ``unet``: tiny VAE, no text encoder, SD1.5's DDIM scheduler.

    Call it with ``prompt_embeds=``/``negative_prompt_embeds=`` (see :func:`random_prompt_embeds`),
    ``height=width=`` the *latent* size (the tiny VAE does not upscale) and ``output_type="latent"``.

    Example:
        >>> pipe = sd_pipeline(sd15_unet())  # doctest: +SKIP
        >>> latents = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=32, width=32,
        ...                num_inference_steps=10, output_type="latent").images  # doctest: +SKIP
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(  # SD1.5's scheduler settings
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_prompt_embeds(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (1, 77, 768) prompt and negative-prompt embeddings, standing in for CLIP's.

    Example:
        >>> emb, neg = random_prompt_embeds()
        >>> emb.shape, neg.shape
        (torch.Size([1, 77, 768]), torch.Size([1, 77, 768]))
    """
    g = torch.Generator().manual_seed(seed)
    shape = (1, SD15_TEXT_TOKENS, SD15_TEXT_DIM)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def quiet_hf_logs() -> None:
    """Show only errors from diffusers' and transformers' loggers (process-wide).

    Building a pipeline without a text encoder or torchvision makes both libraries warn about parts
    this offline setup does not use; for a command-line run those warnings only hide the output.
    """
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def _timed(label: str, fn: Callable[[], _T]) -> tuple[_T, float]:
    print(f"  {label} ...", end="", flush=True)
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    print(f" {seconds:.1f} s", flush=True)
    return result, seconds


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fxcache sd15",
        description="Time a DeepCache generation against an uncached one on the SD1.5 U-Net (random weights, CPU).",
    )
    parser.add_argument("--size", type=int, default=256, help="image size in pixels; latents are size/8 (default 256)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--branch", type=int, default=0, help="skip connection to cut, 0 = shallowest (default 0)")
    parser.add_argument("--interval", type=int, default=5, help="one full step every N steps (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, embeddings and noise (default 0)")
    args = parser.parse_args(list(argv))
    if args.size < 64 or args.size % 64:
        parser.error(
            f"--size {args.size} is not supported: use a multiple of 64 (64, 128, 256, 512). The latents are "
            "size/8 pixels wide, and the pipeline needs latent sizes that are multiples of 8."
        )
    if args.steps < 1 or args.interval < 1 or args.branch < 0:
        parser.error("--steps and --interval must be >= 1 and --branch >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; ``argv`` as for ``python -m fxcache sd15`` (without the ``sd15``). Returns the exit code."""
    import fxcache
    from fxcache.metrics import psnr

    args = _parse(sys.argv[1:] if argv is None else argv)
    quiet_hf_logs()
    latent = args.size // LATENT_FACTOR
    print("fxcache sd15: DeepCache as a graph transform, on the Stable Diffusion 1.5 U-Net architecture")
    print("  The weights are RANDOM (nothing is downloaded), so the latents are noise: only the speed-up and")
    print("  the agreement between cached and uncached latents are meaningful.")
    print(
        f"  {args.size} px ({latent}x{latent} latents), batch 2 (classifier-free guidance), {args.steps} DDIM steps, "
        f"fp32 on CPU with {torch.get_num_threads()} threads; branch {args.branch}, interval {args.interval}",
        flush=True,
    )

    print("\n[1/4] Building the U-Net from its config", flush=True)
    unet, _ = _timed("SD1.5 U-Net, 860M parameters, random weights", lambda: sd15_unet(args.seed))
    pipe = sd_pipeline(unet)
    emb, neg = random_prompt_embeds(args.seed)

    print("\n[2/4] fxcache.explain(unet, ...): where the U-Net can be cut, for a CFG batch of 2", flush=True)
    sample = torch.randn(2, unet.config.in_channels, latent, latent)
    timestep = torch.tensor(999)
    branches, _ = _timed(
        "capturing one graph and counting FLOPs",
        lambda: fxcache.explain(unet, sample, timestep, encoder_hidden_states=torch.cat([neg, emb])),
    )
    print(branches, flush=True)
    if args.branch >= len(branches):
        print(f"error: --branch {args.branch} is out of range: this U-Net has {len(branches)} branches "
              f"(0..{len(branches) - 1})", file=sys.stderr)  # fmt: skip
        return 2

    def generate(steps: int) -> torch.Tensor:
        return pipe(
            prompt_embeds=emb,
            negative_prompt_embeds=neg,
            height=latent,
            width=latent,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(args.seed),
        ).images

    # Two warm-up steps run one full and one shallow step: every kernel and, for fxcache, the one-time
    # capture, at a fraction of a whole generation's cost.
    warmup = min(2, args.steps)
    print("\n[3/4] Uncached generation", flush=True)
    _timed(f"warm-up ({warmup} steps)", lambda: generate(warmup))
    reference, plain_s = _timed(f"timed ({args.steps} steps)", lambda: generate(args.steps))

    print(f"\n[4/4] fxcache.enable(pipe, branch={args.branch}, interval={args.interval})", flush=True)
    fxcache.enable(pipe, branch=args.branch, interval=args.interval)
    try:
        state = pipe.unet.fxcache_state
        _timed(f"warm-up ({warmup} steps, includes the one-time capture)", lambda: generate(warmup))
        full0, shallow0 = state.full_steps, state.shallow_steps
        cached, cached_s = _timed(f"timed ({args.steps} steps)", lambda: generate(args.steps))
        full, shallow = state.full_steps - full0, state.shallow_steps - shallow0
    finally:
        fxcache.disable(pipe)

    # What FLOPs predict for this exact schedule: a full step costs 1, a shallow step f.
    f = branches[args.branch].flops_fraction
    predicted = (full + shallow) / (full + shallow * f)
    agreement = float(psnr(reference, cached, data_range=float(reference.max() - reference.min())))  # latents
    print("\nResult")
    print(f"  uncached   {plain_s:6.1f} s")
    print(f"  fxcache    {cached_s:6.1f} s  {plain_s / cached_s:.2f}x faster (FLOPs predict {predicted:.2f}x)")
    print(f"  steps      {full} full + {shallow} shallow; a shallow step has {100 * f:.1f}% of a full step's FLOPs")
    print(
        f"  agreement  PSNR {agreement:.1f} dB, cached latents against uncached ones "
        "(inf = identical; caching trades a little agreement for speed)",
        flush=True,
    )
    return 0
