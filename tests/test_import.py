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
