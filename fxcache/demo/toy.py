"""The demo's own small world: a procedural data set, and the trained U-Net and feature classifier that
ship with fxcache (the image-quality measures are in :mod:`fxcache.metrics`).

No diffusion weights can be downloaded where fxcache is developed, so the project trains a small
``UNet2DModel`` on a data set it draws itself (``scripts/train_demo_model.py``) and ships the weights in
``fxcache/demo/assets``. The same script trains a small classifier on the same data; its penultimate features
give a Frechet distance between generated and real images, in the manner of FID.

``import fxcache.demo.toy`` needs torch only; diffusers and safetensors are imported by the loaders.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, UNet2DModel

__all__ = [
    "ASSETS",
    "CLASSES",
    "IMAGE_SIZE",
    "Classifier",
    "demo_scheduler",
    "load_classifier",
    "load_demo_unet",
    "shapes",
]

ASSETS = Path(__file__).parent / "assets"
IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "ring", "cross")
COLOURS = ("red", "green", "blue")
CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # label = shape * 3 + colour

# The shipped U-Net: four resolution levels (32, 16, 8, 4 px), one ResNet layer per level, attention at
# 4 px, so the graph has 8 skip connections (branches 0..7) and branch 0 leaves a very cheap shallow path.
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)
# v-prediction: at high noise the model predicts the image itself rather than the noise, which is what gets
# the global colour right (an epsilon model of the same size and training time drew washed-out backgrounds).
# "trailing" spacing starts sampling at the last training timestep.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    clip_sample=True,
)

_BASE_RGB = torch.tensor([[0.85, 0.15, 0.15], [0.15, 0.75, 0.2], [0.2, 0.3, 0.9]])


def shapes(n: int, seed: int = 0, size: int = IMAGE_SIZE, supersample: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of one coloured shape on a dark background, and their labels; deterministic in ``seed``.

    Images are ``n x 3 x size x size`` floats in [-1, 1] (the range a DDPM works in); edges are
    anti-aliased by drawing at ``supersample`` times the size and averaging. Labels index
    :data:`CLASSES`: five shapes (circle, square, triangle, ring, cross) times three colour families,
    with random position, size, rotation, shade and background.

    Example:
        >>> x, y = shapes(4, seed=1)
        >>> tuple(x.shape), y.tolist(), bool(x.min() >= -1 and x.max() <= 1)
        ((4, 3, 32, 32), [1, 13, 14, 11], True)
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    kind = torch.randint(len(SHAPES), (n,), generator=g)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    fg = (_BASE_RGB[colour] + uniform(-0.15, 0.15, n, 3)).clamp(0, 1)
    bg = uniform(0.0, 0.25, n, 1) + uniform(-0.05, 0.05, n, 3)
    cx, cy = uniform(0.3, 0.7, n), uniform(0.3, 0.7, n)
    radius, angle = uniform(0.16, 0.3, n), uniform(0, 2 * math.pi, n)

    s = size * supersample
    coords = (torch.arange(s) + 0.5) / s
    images = torch.empty(n, 3, size, size)
    for lo in range(0, n, 512):  # chunks keep the supersampled masks small
        sl = slice(lo, min(lo + 512, n))
        x = coords.view(1, 1, s) - cx[sl].view(-1, 1, 1)
        y = coords.view(1, s, 1) - cy[sl].view(-1, 1, 1)
        cos, sin, r = angle[sl].cos().view(-1, 1, 1), angle[sl].sin().view(-1, 1, 1), radius[sl].view(-1, 1, 1)
        u, v = (x * cos + y * sin) / r, (y * cos - x * sin) / r  # the shape's own frame, unit radius
        d = torch.sqrt(u * u + v * v)
        tri = torch.ones_like(u, dtype=torch.bool)
        for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):  # equilateral, circumradius 1, inradius 0.5
            tri &= u * math.cos(a) + v * math.sin(a) <= 0.5
        masks = torch.stack(
            [
                d <= 1,
                torch.maximum(u.abs(), v.abs()) <= 0.8,
                tri,
                (d <= 1) & (d >= 0.55),
                ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)),
            ],
            dim=1,
        )
        mask = masks[torch.arange(masks.shape[0]), kind[sl]].float().unsqueeze(1)
        cover = F.avg_pool2d(mask, supersample)
        images[sl] = bg[sl].view(-1, 3, 1, 1) * (1 - cover) + fg[sl].view(-1, 3, 1, 1) * cover
    return images.clamp(0, 1) * 2 - 1, kind * len(COLOURS) + colour


class Classifier(nn.Module):
    """A small CNN over :func:`shapes` images; its 128 pooled features are what the Frechet distance uses."""

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        widths = (3, 32, 64, 128)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(widths):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
            layers += [nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, ``batch x 128``."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _load(name: str, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A shipped file's tensors (none when ``tensors`` is False) and metadata."""
    from safetensors import safe_open

    path = ASSETS / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the demo's weights ship inside the fxcache package. Reinstall fxcache, "
            "or rebuild them with `python scripts/train_demo_model.py`."
        )
    with safe_open(str(path), framework="pt") as f:
        return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), f.metadata() or {}


def training_record() -> dict[str, Any]:
    """How the shipped model was trained (steps, loss, classifier accuracy...), from its metadata only."""
    return json.loads(_load("demo_unet.safetensors", tensors=False)[1].get("training", "{}"))


def load_demo_unet() -> UNet2DModel:
    """The trained demo ``UNet2DModel`` (fp32, eval mode, on CPU) from ``fxcache/demo/assets``.

    Example:
        >>> unet = load_demo_unet()                         # doctest: +SKIP
        >>> sum(p.numel() for p in unet.parameters())       # doctest: +SKIP
        1086515
    """
    from diffusers import UNet2DModel

    state, meta = _load("demo_unet.safetensors")
    unet = UNet2DModel(**json.loads(meta["config"]))
    unet.load_state_dict(state)
    return unet.eval()


def load_classifier() -> Classifier:
    """The trained feature network for the Frechet distance (fp32, eval mode, on CPU)."""
    state, _ = _load("demo_classifier.safetensors")
    net = Classifier()
    net.load_state_dict(state)
    return net.eval()


def demo_scheduler() -> DDIMScheduler:
    """The DDIM scheduler the demo samples with (the noise schedule the U-Net was trained on)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)
