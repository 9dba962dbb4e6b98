"""Deploy ahead of time: export the shipped demo U-Net as one package, then sample from it in a process that
imports neither diffusers nor the model's code.

python examples/export_and_load.py      # about a minute on 2 CPU cores; writes demo_unet.pt2 and demo_ddim.pt

The build side (diffusers installed) exports the cached U-Net and saves the DDIM scheduler's numbers; the
serving side (``--serve``, started here as a fresh process) loads the package with ``fxcache.load`` and runs
DDIM itself, in plain torch: the demo model predicts v, and DDIM with eta=0 needs only alphas_cumprod.
"""

import subprocess
import sys

import torch

import fxcache

PACKAGE, SCHEDULE, BATCH, STEPS = "demo_unet.pt2", "demo_ddim.pt", 8, 25


def ddim(unet, x: torch.Tensor, schedule: dict) -> torch.Tensor:
    """DDIM (eta=0) for a v-prediction model, given the scheduler's timesteps and alphas_cumprod."""
    ts, ac, final = schedule["timesteps"], schedule["alphas_cumprod"], schedule["final_alpha_cumprod"]
    for i, t in enumerate(ts):
        out = unet(x, t)
        v = out[0] if isinstance(out, tuple) else out.sample  # the package returns a tuple, diffusers a dataclass
        a = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else final
        x0 = a.sqrt() * x - (1 - a).sqrt() * v
        eps = a.sqrt() * v + (1 - a).sqrt() * x
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def build() -> torch.Tensor:
    from fxcache.demo import toy  # needs diffusers: the build side only

    unet, scheduler = toy.load_demo_unet(), toy.demo_scheduler()
    scheduler.set_timesteps(STEPS)
    schedule = {
        "timesteps": scheduler.timesteps,
        "alphas_cumprod": scheduler.alphas_cumprod,
        "final_alpha_cumprod": scheduler.final_alpha_cumprod,
        "noise": torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    }
    torch.save(schedule, SCHEDULE)
    cached = fxcache.transform(unet, branch=0, interval=3)
    fxcache.export(cached, PACKAGE, (schedule["noise"], schedule["timesteps"][0]))  # the three lines: export,
    with torch.no_grad():
        return ddim(cached, schedule["noise"], schedule)  # the same sampling in-process, for comparison


def serve() -> None:
    runner = fxcache.load(PACKAGE)  # load,
    schedule = torch.load(SCHEDULE)
    with torch.no_grad():
        images = ddim(runner, schedule["noise"], schedule)  # and call it like the model: runner(sample, t)
    assert "diffusers" not in sys.modules
    torch.save(images, "demo_images.pt")
    print(f"served {runner.fxcache_state.full_steps} full and {runner.fxcache_state.shallow_steps} shallow steps")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve()
    else:
        in_process = build()
        subprocess.run([sys.executable, __file__, "--serve"], check=True)
        served = torch.load("demo_images.pt")
        diff = ((served - in_process).abs().max() / in_process.abs().max()).item()
        print(f"package {PACKAGE}: images equal in-process fxcache to {diff:.1e} (relative)")
