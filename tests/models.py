"""Models the tests run on: plain-PyTorch U-Nets written here, and tiny diffusers configs.

diffusers is imported inside the builders so that tests which do not need it never import it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxcache.demo.sd15 import tiny_vae  # the same one-block VAE the demo uses


class ResBlock(nn.Module):
    """A residual block: its addition is *not* a long skip."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class SelfAttention(nn.Module):
    """Self-attention over pixels with a residual: its (B, heads, tokens, dim) tensors must not
    make the residual look like a skip through lower resolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(ch, num_heads=2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class PlainUNet(nn.Module):
    """A three-level U-Net in plain PyTorch, with concatenated (``merge="cat"``) or additive
    (``merge="add"``) long skips, residual blocks and attention. It has 3 long skips:
    stem -> out_block, level 1 -> up1, level 2 -> up2 (shallowest first)."""

    def __init__(self, merge: str = "cat", ch: int = 8, in_ch: int = 3) -> None:
        super().__init__()
        self.merge = merge
        self.temb = nn.Linear(1, ch)
        self.stem = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down1 = nn.Sequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1), ResBlock(ch))
        self.down2 = nn.Sequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1), ResBlock(ch))
        self.mid = nn.Sequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1), ResBlock(ch), SelfAttention(ch))
        width = 2 * ch if merge == "cat" else ch
        self.up2 = nn.Sequential(nn.Conv2d(width, ch, 3, padding=1), ResBlock(ch))
        self.up1 = nn.Sequential(nn.Conv2d(width, ch, 3, padding=1), ResBlock(ch))
        self.out_block = nn.Sequential(nn.Conv2d(width, ch, 3, padding=1), ResBlock(ch))
        self.head = nn.Conv2d(ch, in_ch, 3, padding=1)

    def _merge(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([deep, skip], dim=1) if self.merge == "cat" else deep + skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.temb(t.reshape(-1, 1).to(x.dtype)).reshape(-1, self.temb.out_features, 1, 1)
        h0 = self.stem(x) + emb
        h1 = self.down1(h0)
        h2 = self.down2(h1)
        h = nn.functional.interpolate(self.mid(h2), scale_factor=2.0)
        h = nn.functional.interpolate(self.up2(self._merge(h, h2)), scale_factor=2.0)
        h = nn.functional.interpolate(self.up1(self._merge(h, h1)), scale_factor=2.0)
        return self.head(self.out_block(self._merge(h, h0)))


class NoSkipNet(nn.Module):
    """Residual blocks, attention and a down/up path, but no long skip at all."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.body = nn.Sequential(ResBlock(ch), nn.Conv2d(ch, ch, 3, stride=2, padding=1), SelfAttention(ch))
        self.head = nn.ConvTranspose2d(ch, 3, 2, stride=2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: cannot be one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return h if h.sum() > 0 else -h


class TinyUNet(nn.Module):
    """One long skip around one stride-2 convolution: the smallest U-Net, captured in a fraction of PlainUNet's
    time (for tests that capture hundreds of times)."""

    def __init__(self, ch: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.head = nn.Conv2d(2 * ch, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.stem(x) * t.reshape(-1, 1, 1, 1).to(x.dtype) / 1000
        deep = nn.functional.interpolate(self.down(h), scale_factor=2.0)
        return self.head(torch.cat([deep, h], dim=1))


def plain_inputs(batch: int = 2, size: int = 16, t: float = 500.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, size, size), torch.full((batch,), t)


# -- diffusers: tiny configs built offline -------------------------------------------------------------

CROSS_DIM = 32


def sd_unet(layers_per_block: int = 2, seed: int = 0, blocks: int = 4) -> Any:
    """SD1.x-like: 4 down blocks (all but the last with cross-attention), 2 layers each -> 12 skips.

    ``blocks=2`` gives a smaller graph for the tests that compile it.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64)[-blocks:],
        layers_per_block=layers_per_block,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (blocks - 1),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


POOLED_DIM, TIME_EMBED_DIM = 32, 8


def sdxl_unet(seed: int = 0) -> Any:
    """SD-XL-like: 3 down blocks (the first without attention), text_time conditioning -> 9 skips."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM,
        use_linear_projection=True,
    ).eval()


def unet2d(seed: int = 0) -> Any:
    """diffusers' unconditional UNet2DModel: 1 + 3 + 2 = 6 skips."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


def ddim() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip


def euler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def sd_pipeline(unet: Any = None, scheduler: Any = None) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=unet if unet is not None else sd_unet(),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        scheduler=scheduler if scheduler is not None else ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(scheduler: Any = None) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=sdxl_unet(),
        scheduler=scheduler if scheduler is not None else ddim(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_inputs(batch: int = 2, size: int = 16, t: int = 500, seed: int = 1) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g)
    emb = torch.randn(batch, 7, CROSS_DIM, generator=g)
    return (sample, torch.tensor(t)), {"encoder_hidden_states": emb}


def sdxl_inputs(batch: int = 2, size: int = 16, t: int = 500, seed: int = 1) -> tuple[tuple, dict[str, Any]]:
    args, kwargs = sd_inputs(batch, size, t, seed)
    g = torch.Generator().manual_seed(seed + 1)
    kwargs["added_cond_kwargs"] = {
        "text_embeds": torch.randn(batch, POOLED_DIM, generator=g),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32),
    }
    return args, kwargs


def generate(
    pipe: Any, steps: int = 10, seed: int = 0, images: int = 1, size: int = 16, guidance: float = 7.5, **extra: Any
) -> torch.Tensor:
    """One whole generation (classifier-free guidance unless ``guidance=1``), returning latents.

    Pipelines that start from an image (img2img, inpainting) get a fixed random image, mask and
    ``strength=0.6`` unless ``extra`` says otherwise.
    """
    g = torch.Generator().manual_seed(seed + 100)
    name = type(pipe).__name__
    if "Img2Img" in name or "Inpaint" in name:
        extra.setdefault("image", torch.rand(1, 3, size, size, generator=g))
        extra.setdefault("strength", 0.6)
    if "Inpaint" in name:
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
        extra.setdefault("mask_image", mask)
    kwargs: dict[str, Any] = {
        "prompt_embeds": torch.randn(1, 7, CROSS_DIM, generator=g),
        "negative_prompt_embeds": torch.randn(1, 7, CROSS_DIM, generator=g),
    }
    if type(pipe).__name__.startswith("StableDiffusionXL"):
        kwargs["pooled_prompt_embeds"] = torch.randn(1, POOLED_DIM, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(1, POOLED_DIM, generator=g)
    return pipe(
        **kwargs,
        height=size,
        width=size,
        num_inference_steps=steps,
        num_images_per_prompt=images,
        guidance_scale=guidance,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **extra,
    ).images


def pndm() -> Any:
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )


def heun() -> Any:
    from diffusers import HeunDiscreteScheduler

    return HeunDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def sd_img2img_pipeline(scheduler: Any = None) -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**sd_pipeline(scheduler=scheduler).components)


def sd_inpaint_pipeline() -> Any:
    from diffusers import StableDiffusionInpaintPipeline

    torch.manual_seed(0)
    unet = sd_unet()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**unet.config, "in_channels": 9}).eval()
    pipe = StableDiffusionInpaintPipeline(**sd_pipeline(unet=unet).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_img2img_pipeline() -> Any:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**sdxl_pipeline().components, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def svd_unet(seed: int = 0) -> Any:
    """Stable Video Diffusion's UNetSpatioTemporalConditionModel, tiny."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        layers_per_block=2,
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        num_frames=3,
    ).eval()


def svd_inputs(batch: int = 1, frames: int = 3, size: int = 16, t: float = 500.0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, frames, 8, size, size, generator=g)
    emb = torch.randn(batch, 1, 32, generator=g)
    added = torch.tensor([[6.0, 127.0, 0.02]] * batch)
    return (sample, torch.tensor(t)), {"encoder_hidden_states": emb, "added_time_ids": added}


def controlnet(unet: Any, seed: int = 0) -> Any:
    """A ControlNet made from ``unet`` (random zero-conv weights, so its residuals are not zero)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,)).eval()  # no downsampling
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.1)
            block.bias.normal_(0, 0.1)
    return net


def sd_controlnet_pipeline(nets: int = 1) -> Any:
    """StableDiffusionControlNetPipeline on the tiny SD U-Net; ``nets=2`` gives a MultiControlNetModel."""
    from diffusers import StableDiffusionControlNetPipeline

    unet = sd_unet()
    net = controlnet(unet) if nets == 1 else [controlnet(unet, seed=i) for i in range(nets)]
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=net, scheduler=ddim(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image(size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def full_then_shallow(cached: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Steps 0 (full) and 1 (shallow) of one generation, both on these inputs.

    Two plain calls at the same timestep are one step (the second repeats the first's decision), so
    the step numbers are given through ``step_source`` for the two calls.
    """
    from fxcache.runtime import StepInfo

    previous = cached.step_source
    steps = iter([StepInfo(True, 0, None), StepInfo(False, 1, None)])
    cached.step_source = lambda: next(steps)
    try:
        return cached(*args, **kwargs), cached(*args, **kwargs)
    finally:
        cached.step_source = previous


def sd_controlnet_img2img_pipeline(nets: int = 1) -> Any:
    """StableDiffusionControlNetImg2ImgPipeline on the same tiny U-Net and ControlNet(s)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    pipe = StableDiffusionControlNetImg2ImgPipeline(**sd_controlnet_pipeline(nets).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_controlnet_inpaint_pipeline() -> Any:
    """StableDiffusionControlNetInpaintPipeline: a 9-channel inpainting U-Net; its ControlNet sees 4 channels."""
    from diffusers import StableDiffusionControlNetInpaintPipeline, UNet2DConditionModel

    unet = sd_unet()
    net = controlnet(unet)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**unet.config, "in_channels": 9}).eval()
    pipe = StableDiffusionControlNetInpaintPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=net, scheduler=ddim(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_controlnet_pipeline() -> Any:
    """StableDiffusionXLControlNetPipeline on the tiny SD-XL U-Net, with a ControlNetModel.from_unet of it."""
    from diffusers import StableDiffusionXLControlNetPipeline

    unet = sdxl_unet()
    pipe = StableDiffusionXLControlNetPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, controlnet=controlnet(unet), scheduler=ddim(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
