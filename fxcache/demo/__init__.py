"""fxcache's demos: not part of the library, and never imported by ``import fxcache``.

- :mod:`fxcache.demo.run`: ``python -m fxcache demo`` (``make demo``), DeepCache on a small model that
  ships with fxcache, cached against uncached images, speed-ups, PSNR/SSIM and a Frechet distance;
- :mod:`fxcache.demo.toy`: that model's world: the drawn data set, the trained U-Net and feature
  classifier in ``fxcache/demo/assets`` and their loaders;
- :mod:`fxcache.demo.sd15`: ``python -m fxcache sd15``, timing on the Stable Diffusion 1.5 U-Net
  architecture with random weights; its builders are shared with ``benchmarks/`` and the tests.

They need the ``demo`` extra (diffusers, safetensors, tqdm, pillow); each imports diffusers only inside the
functions that need it.
"""
