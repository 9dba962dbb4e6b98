"""DeepCache on the model that ships with fxcache, through a stock diffusers pipeline.

python examples/shipped_model.py        # a few seconds on CPU; writes shipped_model.png
"""

import torch
from diffusers import DDIMPipeline

import fxcache
from fxcache.demo import toy
from fxcache.metrics import psnr

pipe = DDIMPipeline(unet=toy.load_demo_unet(), scheduler=toy.demo_scheduler())
pipe.set_progress_bar_config(disable=True)


def generate() -> torch.Tensor:
    out = pipe(batch_size=8, num_inference_steps=25, generator=torch.Generator().manual_seed(0), output_type="np")
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)


uncached = generate()
fxcache.enable(pipe, branch=0, interval=3)  # pipe.unet now runs DeepCache: 9 full + 16 shallow steps
cached = generate()
fxcache.disable(pipe)

psnr_db = psnr(uncached, cached, data_range=1.0, per_image=True)  # pixels in [0, 1]: data range 1
print("PSNR of each cached image against its uncached twin (dB):", psnr_db.round().tolist())
rows = torch.cat([uncached, cached]).clamp(0, 1)  # top row uncached, bottom row cached
grid = (rows * 255).round().byte().view(2, 8, 3, 32, 32).permute(0, 3, 1, 4, 2).reshape(64, 256, 3)
from PIL import Image  # noqa: E402

Image.fromarray(grid.numpy()).resize((1024, 256), Image.NEAREST).save("shipped_model.png")
print("wrote shipped_model.png (top: uncached, bottom: fxcache branch 0, N=3)")
