"""``python -m fxcache demo``: what DeepCache does to speed and to pictures, on a model that ships with fxcache.

The model is a small ``UNet2DModel`` trained on procedurally drawn coloured shapes (``fxcache/demo/assets``,
see its ``MODEL_CARD.md``), sampled with diffusers' ``DDIMPipeline``. The demo generates one fixed-seed
batch uncached and again under several fxcache settings (branches, intervals, schedules, eager and
compiled), then

- prints a table: wall time, speed-up, PSNR and SSIM of each image against its uncached twin (the same
  initial noise), and an FID-style Frechet distance to real images in a classifier's feature space;
- writes one labelled PNG grid: a row per setting, a column per seed.

``--quick`` runs a small version of the same thing (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config

from fxcache import metrics
from fxcache.demo import toy
from fxcache.schedule import ScheduleLike, nonuniform

__all__ = ["Setting", "default_settings", "main", "run"]

REAL_SEED = 1000  # the classifier's held-out images: the "real" side of the Frechet distance
FLOOR_SEED = 2000  # fresh real images, scored like a generated batch: the best a perfect model could get


@dataclass(frozen=True)
class Setting:
    """One row of the demo: uncached when ``branch`` is None."""

    label: str
    branch: int | None = None
    interval: int | None = None
    schedule: ScheduleLike | None = None
    compiled: bool = False

    @property
    def cached(self) -> bool:
        return self.branch is not None


def default_settings(steps: int, *, quick: bool = False, compile: bool = True) -> list[Setting]:
    """The demo's rows: uncached first, then fxcache at branches 0 and 1, N in {2, 3, 5}, the paper's
    non-uniform schedule (reference and literal Eq. 7), and compiled versions of a few.

    The non-uniform center is scaled from the paper's 15-of-50 steps to ``0.3 * steps``.

    Example:
        >>> [s.label for s in default_settings(10, quick=True)]
        ['uncached', 'b0 N3', 'b1 N5', 'uncached compiled', 'b0 N3 compiled']
    """
    center = 0.3 * steps
    rows = [Setting("uncached")]
    if quick:
        rows += [Setting("b0 N3", 0, 3), Setting("b1 N5", 1, 5)]
    else:
        rows += [Setting(f"b{b} N{n}", b, n) for b in (0, 1) for n in (2, 3, 5)]
        rows += [
            Setting("b0 N5 nonuniform", 0, schedule=nonuniform(5, center=center, power=1.4)),
            Setting("b0 N5 nonuniform Eq.7", 0, schedule=nonuniform(5, center=center, power=1.4, reference=False)),
        ]
    if compile:
        rows += [Setting("uncached compiled", compiled=True), Setting("b0 N3 compiled", 0, 3, compiled=True)]
        if not quick:
            rows += [Setting("b0 N5 compiled", 0, 5, compiled=True), Setting("b1 N3 compiled", 1, 3, compiled=True)]
    return rows


@dataclass
class Row:
    setting: Setting
    seconds: float
    setup_seconds: float
    full_steps: int
    shallow_steps: int
    images: torch.Tensor  # batch x 3 x H x W in [0, 1], on CPU
    psnr: float = math.inf
    ssim: float = 1.0
    fd: float = math.nan
    speedup: float = 1.0
    speedup_same_engine: float = 1.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pipeline(device: torch.device) -> Any:
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet=toy.load_demo_unet(), scheduler=toy.demo_scheduler()).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: Any, batch: int, steps: int, seed: int) -> torch.Tensor:
    out = pipe(
        batch_size=batch,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),  # CPU noise: the same images on any device
        output_type="np",
    ).images
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


def compile_spec(device: torch.device) -> Any:
    """The demo's ``compile=`` for both compiled engines: Inductor with freezing on CPU, CUDA graphs on CUDA.

    Example:
        >>> compile_spec(torch.device("cpu"))
        {'options': {'freezing': True}}
    """
    return {"options": {"freezing": True}} if device.type == "cpu" else True


def _run_setting(pipe: Any, s: Setting, batch: int, steps: int, seed: int, device: torch.device, repeats: int) -> Row:
    import fxcache
    from fxcache.adapters.diffusers import swap_unet
    from fxcache.compile import compile_options, dynamo_config

    spec = compile_spec(device) if s.compiled else False
    opts = compile_options(spec, device)
    if s.cached:
        fxcache.enable(pipe, branch=s.branch, interval=s.interval, schedule=s.schedule, compile=spec)
        unet = pipe.unet
        fxcache.disable(pipe)
    else:
        unet = pipe.unet if opts is None else torch.compile(pipe.unet, **opts)

    def timed(steps: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = _generate(pipe, batch, steps, seed)
        _sync(device)
        return out, time.perf_counter() - start

    with swap_unet(pipe, unet):  # the pipeline's own UNet is back afterwards, whatever happens
        # Two steps run one full and one shallow step at the real batch size: the one-time capture and
        # compilation happen here, and are reported as setup time, not generation time. The plain compiled
        # UNet needs freezing set globally (fxcache sets it around its own graphs).
        with torch._inductor.config.patch(dynamo_config(opts)):
            setup = timed(2)[1]
        state = getattr(unet, "fxcache_state", None) if s.cached else None
        before = (state.full_steps, state.shallow_steps) if state else (0, 0)
        images, seconds = timed(steps)
        full, shallow = (state.full_steps - before[0], state.shallow_steps - before[1]) if state else (steps, 0)
        for _ in range(repeats - 1):  # the same generation again: the fastest run is the least disturbed one
            seconds = min(seconds, timed(steps)[1])
    return Row(s, seconds, setup, full, shallow, images)


@torch.no_grad()
def _features(net: toy.Classifier, x: torch.Tensor) -> torch.Tensor:
    """Classifier features of images in [-1, 1] (the data set's range), in chunks."""
    return torch.cat([net.features(x[i : i + 500]) for i in range(0, len(x), 500)])


def run(
    settings: Sequence[Setting],
    *,
    samples: int,
    steps: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    repeats: int = 1,
    progress: bool = True,
) -> tuple[list[Row], dict[str, float]]:
    """Generate ``samples`` images per setting and score them; returns the rows and reference scores.

    Each setting's generation is timed ``repeats`` times (after a warm-up) and the fastest is reported.
    ``settings[0]`` must be the uncached eager baseline: PSNR, SSIM and speed-ups are measured against it.
    """
    from tqdm import tqdm

    device = torch.device(device)
    if settings[0].cached or settings[0].compiled:
        raise ValueError("the first setting must be the uncached eager baseline, Setting('uncached')")
    pipe = _pipeline(device)
    net = toy.load_classifier()
    real = _features(net, toy.shapes(2000, seed=REAL_SEED)[0])
    floor = metrics.frechet_distance(_features(net, toy.shapes(samples, seed=FLOOR_SEED)[0]), real)

    rows: list[Row] = []
    bar = tqdm(settings, desc="fxcache demo", unit="setting", disable=not progress, file=sys.stderr)
    for s in bar:
        bar.set_postfix_str(s.label)
        rows.append(_run_setting(pipe, s, samples, steps, seed, device, repeats))
    base = rows[0]
    base_compiled = next((r for r in rows if r.setting.compiled and not r.setting.cached), None)
    for r in rows:
        r.fd = metrics.frechet_distance(_features(net, r.images * 2 - 1), real)  # pipeline images are in [0, 1]
        r.speedup = base.seconds / r.seconds
        same = base_compiled if r.setting.compiled and base_compiled else base
        r.speedup_same_engine = same.seconds / r.seconds
        if r is not base:
            # Pixels in [0, 1]: data range 1. Identical images (inf) and fp32-noise-level differences count as
            # 99 dB in the mean.
            r.psnr = float(metrics.psnr(base.images, r.images, data_range=1.0, per_image=True).clamp(max=99).mean())
            r.ssim = float(metrics.ssim(base.images, r.images, data_range=1.0).mean())
    return rows, {"fd_real_vs_real": floor}


def table(rows: Sequence[Row]) -> str:
    """The demo's results as a fixed-width text table."""
    head = (
        f"{'setting':24s} {'steps full+shallow':>18s} {'time s':>7s} {'setup s':>8s} {'speed-up':>8s} "
        f"{'same eng.':>9s} {'PSNR dB':>8s} {'SSIM':>6s} {'FD':>7s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ps = "same" if math.isinf(r.psnr) else ">=99" if r.psnr >= 99 else f"{r.psnr:.1f}"
        lines.append(
            f"{r.setting.label:24s} {f'{r.full_steps}+{r.shallow_steps}':>18s} {r.seconds:7.2f} {r.setup_seconds:8.1f} "
            f"{r.speedup:7.2f}x {r.speedup_same_engine:8.2f}x {ps:>8s} {r.ssim:6.3f} {r.fd:7.2f}"
        )
    return "\n".join(lines)


def save_grid(rows: Sequence[Row], path: Path, columns: int = 8, scale: int = 3) -> Path:
    """One PNG: a labelled row per setting, the first ``columns`` images (same seeds in every row)."""
    from PIL import Image, ImageDraw

    n = min(columns, len(rows[0].images))
    size = rows[0].images.shape[-1] * scale
    pad, label_w, head_h = 4, 300, 22
    grid = Image.new("RGB", (label_w + n * (size + pad), head_h + len(rows) * (size + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), "fxcache demo: same seeds in every column", fill=(0, 0, 0))
    for i, r in enumerate(rows):
        y = head_h + i * (size + pad)
        if math.isinf(r.psnr):
            ps = "reference"
        else:
            ps = f"PSNR {'>= 99' if r.psnr >= 99 else f'{r.psnr:.1f}'} dB, SSIM {r.ssim:.3f}"
        draw.text((4, y + 4), r.setting.label, fill=(0, 0, 0))
        draw.text((4, y + 20), f"{r.speedup:.2f}x, {r.seconds:.1f} s", fill=(60, 60, 60))
        draw.text((4, y + 36), ps, fill=(60, 60, 60))
        draw.text((4, y + 52), f"FD {r.fd:.2f}", fill=(60, 60, 60))
        for j in range(n):
            pixels = (r.images[j].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
            grid.paste(tile, (label_w + j * (size + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _row_dict(r: Row) -> dict[str, Any]:
    """A row for JSON: non-finite numbers (PSNR of identical images) become null."""
    out: dict[str, Any] = {"setting": r.setting.label}
    for k, v in vars(r).items():
        if k not in ("images", "setting"):
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fxcache demo",
        description="Generate with fxcache's own trained model, uncached and cached, and compare speed and images.",
    )
    parser.add_argument("--out", type=Path, default=Path("fxcache_demo.png"), help="grid PNG (./fxcache_demo.png)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    parser.add_argument("--samples", type=int, default=None, help="images per setting (default 256; --quick 8)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 25; --quick 10)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per setting, fastest kept (2; --quick 1)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include the torch.compile rows (default: yes, except with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run: 8 images, 10 steps, 3 eager settings")
    args = parser.parse_args(list(argv))
    args.samples = args.samples or (8 if args.quick else 256)
    args.steps = args.steps or (10 if args.quick else 25)
    args.compile = not args.quick if args.compile is None else args.compile
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.samples < 2 or args.steps < 2 or args.repeats < 1:
        parser.error("--samples and --steps must be at least 2, --repeats at least 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but this torch build sees no CUDA device; use --device cpu")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; ``argv`` as for ``python -m fxcache demo`` (without the ``demo``). Returns the exit code."""
    from fxcache.demo.sd15 import quiet_hf_logs

    args = _parse(sys.argv[1:] if argv is None else argv)
    quiet_hf_logs()
    settings = default_settings(args.steps, quick=args.quick, compile=args.compile)
    record = toy.training_record()
    print("fxcache demo: DeepCache on fxcache's own trained model (fxcache/demo/assets/MODEL_CARD.md)")
    print(
        f"  {args.samples} images of 32x32 px per setting, {args.steps} DDIM steps, fp32 on {args.device}"
        + (f" ({torch.get_num_threads()} threads)" if args.device.type == "cpu" else "")
        + f", torch {torch.__version__}; {len(settings)} settings, fastest of {args.repeats} timed runs each",
        flush=True,
    )
    if any(s.compiled for s in settings):
        how = "Inductor with freezing (weights as constants)" if args.device.type == "cpu" else "CUDA graphs"
        print(f"  compiled rows: torch.compile, {how}, for the plain and the fxcache UNet alike", flush=True)
    rows, ref = run(
        settings, samples=args.samples, steps=args.steps, seed=args.seed, device=args.device, repeats=args.repeats
    )
    print()
    print(table(rows))
    acc = record.get("classifier_heldout_accuracy")
    print(
        "\n  speed-up: against the uncached eager run; 'same eng.': against uncached on the same engine (eager or "
        "compiled).\n  time: the fastest timed run; setup: one-time capture and compilation.\n  PSNR/SSIM: each "
        "image against its uncached twin (same noise).\n  FD: Frechet distance to 2000 real images in a shape "
        "classifier's features"
        + (f" (held-out accuracy {acc:.1%})" if acc is not None else "")
        + f"; {args.samples} fresh real images score {ref['fd_real_vs_real']:.2f}, the floor for this sample size."
        + ("\n  (FD from fewer than 128 images is noisy: the default is 256.)" if args.samples < 128 else "")
    )
    path = save_grid(rows, args.out)
    print(f"\n  grid: {path} (rows: settings; columns: the same seeds)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                dict(
                    device=str(args.device),
                    torch=torch.__version__,
                    samples=args.samples,
                    steps=args.steps,
                    dtype="float32",
                    image="3x32x32",
                    reference=ref,
                    rows=[_row_dict(r) for r in rows],
                ),
                indent=1,
                default=str,
            )
        )
    return 0
