from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    code = (
        "import sys, fxcache, torch\n"
        "assert 'diffusers' not in sys.modules, 'import fxcache pulled in diffusers'\n"
        "assert not torch.cuda.is_initialized(), 'import fxcache initialised CUDA'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names() -> None:
    import fxcache
    from fxcache.adapters import diffusers

    for name in ("plan", "CachePlan", "CacheSpec", "CachedModule", "transform", "explain"):
        assert name in fxcache.__all__ and hasattr(fxcache, name), name
    assert callable(fxcache.plan) and fxcache.plan.__name__ == "plan", "fxcache.plan is the function"
    assert "swap_unet" in diffusers.__all__
