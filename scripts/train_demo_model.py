"""Train the demo's U-Net and its feature classifier; write them to ``fxcache/demo/assets``.

    python scripts/train_demo_model.py                 # about 20 minutes on a 2-core CPU
    python scripts/train_demo_model.py --steps 50 --classifier-steps 20 --out /tmp/x   # a smoke run

What it does, deterministically given ``--seed`` (same machine, same torch build):

1. draws a training set with :func:`fxcache.demo.toy.shapes` (coloured shapes, 32x32) and a held-out set
   from a different seed;
2. trains :class:`fxcache.demo.toy.Classifier` to tell the 15 classes apart and reports its held-out
   accuracy (its penultimate features are the demo's FID-style score);
3. trains a diffusers ``UNet2DModel`` (:data:`fxcache.demo.toy.UNET_CONFIG`) as a v-predicting DDPM with the
   cosine noise schedule (:data:`fxcache.demo.toy.SCHEDULER_CONFIG`), AdamW, warm-up then cosine
   learning-rate decay, and keeps an exponential moving average of its weights, which is what ships;
4. writes ``demo_unet.safetensors``, ``demo_classifier.safetensors`` (config and training record in the
   metadata) and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxcache.demo import toy  # noqa: E402


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> tuple[toy.Classifier, list[float]]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = toy.Classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    losses = []
    net.train()
    for step in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        xb = x[idx]
        # mild noise so that features of not-quite-clean generated images stay meaningful
        xb = xb + 0.05 * torch.randn(xb.shape, generator=g)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"classifier step {step:5d}  loss {loss.item():.4f}", flush=True)
    return net.eval(), losses


@torch.no_grad()
def accuracy(net: toy.Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def train_unet(x: torch.Tensor, steps: int, batch: int, lr: float, seed: int):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    unet = UNet2DModel(**toy.UNET_CONFIG)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = DDPMScheduler(**toy.SCHEDULER_CONFIG)
    alphas = noise_sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10 + 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    start = time.perf_counter()
    unet.train()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        x0 = x[idx]
        t = torch.randint(noise_sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if noise_sched.config.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        else:
            target = noise
        loss = F.mse_loss(unet(xt, t).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            el = time.perf_counter() - start
            print(f"unet step {step:5d}  loss(avg 100) {recent:.4f}  {el:6.0f} s", flush=True)
    return ema, losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="U-Net optimizer steps (default 3000)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--classifier-steps", type=int, default=600)
    ap.add_argument("--train-size", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=toy.ASSETS, help="output folder (default fxcache/demo/assets)")
    args = ap.parse_args()
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x, y = toy.shapes(args.train_size, seed=args.seed)
    xh, yh = toy.shapes(2000, seed=args.seed + 1000)
    print(f"data: {len(x)} training and {len(xh)} held-out images in {time.perf_counter() - t0:.0f} s", flush=True)

    t1 = time.perf_counter()
    clf, clf_losses = train_classifier(x, y, args.classifier_steps, args.seed)
    acc = accuracy(clf, xh, yh)
    clf_time = time.perf_counter() - t1
    print(f"classifier: held-out accuracy {acc:.4f} ({clf_time:.0f} s)", flush=True)

    t2 = time.perf_counter()
    ema, losses = train_unet(x, args.steps, args.batch, args.lr, args.seed)
    unet_time = time.perf_counter() - t2
    final_loss = sum(losses[-200:]) / len(losses[-200:])

    record = dict(
        seed=args.seed,
        train_size=args.train_size,
        unet_steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        ema_decay=0.999,
        final_loss_avg200=round(final_loss, 5),
        unet_train_seconds=round(unet_time),
        classifier_steps=args.classifier_steps,
        classifier_heldout_accuracy=round(acc, 4),
        classifier_train_seconds=round(clf_time),
        torch=torch.__version__,
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
    )
    params = sum(p.numel() for p in ema.parameters())
    save_file(
        {k: v.contiguous() for k, v in ema.state_dict().items()},
        str(args.out / "demo_unet.safetensors"),
        metadata={"config": json.dumps(toy.UNET_CONFIG), "training": json.dumps(record)},
    )
    save_file(
        {k: v.contiguous() for k, v in clf.state_dict().items()},
        str(args.out / "demo_classifier.safetensors"),
        metadata={"training": json.dumps(record)},
    )
    (args.out / "MODEL_CARD.md").write_text(model_card(record, params))
    print(json.dumps(record, indent=1))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


def model_card(r: dict, params: int) -> str:
    return f"""# fxcache demo model

A small unconditional diffusion model that ships with fxcache so that `python -m fxcache demo` shows real
images offline. Trained from scratch by `scripts/train_demo_model.py` (seed {r["seed"]}); nothing was downloaded.

- **Data:** `fxcache.demo.toy.shapes`: 32x32 RGB images of one shape (circle, square, triangle, ring, cross) in one
  of three colour families (red, green, blue) on a dark background, with random position, size, rotation and
  shade; drawn by the code itself. {r["train_size"]} training images (seed {r["seed"]}).
- **Model:** diffusers `UNet2DModel`, {params:,} parameters, fp32: four levels (16, 32, 64, 64 channels; 32 to
  4 px), one ResNet layer per level, self-attention at 4 px; 8 skip connections (fxcache branches 0-7).
  v-prediction, 1000-step cosine ("squaredcos_cap_v2") noise schedule; sampled with DDIM ("trailing"
  timestep spacing, `fxcache.demo.toy.demo_scheduler()`).
- **Training:** {r["unet_steps"]} AdamW steps, batch {r["batch"]}, peak learning rate {r["lr"]} (warm-up, then cosine
  decay), gradient clipping 1.0; the shipped weights are the exponential moving average (decay {r["ema_decay"]}).
  Final training loss (MSE on v, mean of the last 200 steps): {r["final_loss_avg200"]}.
  {r["unet_train_seconds"]} s on {r["machine"]}, torch {r["torch"]}.
- **Feature classifier** (`demo_classifier.safetensors`, `fxcache.demo.toy.Classifier`): a 6-layer CNN trained
  {r["classifier_steps"]} steps to tell the 15 shape-colour classes apart; held-out accuracy
  {r["classifier_heldout_accuracy"]:.2%} on 2000 images from another seed. Its 128 pooled features give the demo's
  FID-style Frechet distance.
- **Use:** a toy for showing what DeepCache does to speed and images. Not a general image model.
"""


if __name__ == "__main__":
    sys.exit(main())
