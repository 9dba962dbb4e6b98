"""Moved: the compile benchmark is ``python -m benchmarks.compile`` (run from the repository root).

This file only forwards to it, with the same arguments, so that ``benchmarks/gpu_check.sh`` keeps working
until it calls the module itself; delete it then.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    # exec, not a child process: the same pid, so a timeout's SIGINT reaches the benchmark itself
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.compile", *sys.argv[1:]], env)
