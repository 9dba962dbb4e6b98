from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    """``import fxcache`` is the core only: no demo, no diffusers, no plotting or image libraries, no Ray, no CUDA."""
    code = (
        "import sys, fxcache, fxcache.serve, torch\n"
        "for name in ('fxcache.demo', 'diffusers', 'matplotlib', 'PIL', 'ray'):\n"
        "    assert name not in sys.modules, f'import fxcache pulled in {name}'\n"
        "assert not torch.cuda.is_initialized(), 'import fxcache initialised CUDA'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names() -> None:
    import fxcache
    from fxcache.adapters import diffusers

    for name in ("plan", "CachePlan", "CacheSpec", "CachedModule", "transform", "explain", "export", "load"):
        assert name in fxcache.__all__ and hasattr(fxcache, name), name
    assert callable(fxcache.plan) and fxcache.plan.__name__ == "plan", "fxcache.plan is the function"
    assert callable(fxcache.export) and fxcache.export.__name__ == "export", "fxcache.export is the function"
    assert "swap_unet" in diffusers.__all__


def test_metrics_import_is_lean() -> None:
    """fxcache.metrics is torch only: the benchmarks and tests use it without the demo's dependencies."""
    code = (
        "import sys, fxcache.metrics\n"
        "for name in ('fxcache.demo', 'diffusers', 'matplotlib', 'PIL'):\n"
        "    assert name not in sys.modules, f'import fxcache.metrics pulled in {name}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
