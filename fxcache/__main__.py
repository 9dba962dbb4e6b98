"""``python -m fxcache <command>``: the command-line entry point (one command for now: ``demo``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

USAGE = """\
usage: python -m fxcache demo [--size 256] [--steps 10] [--branch 0] [--interval 5] [--seed 0]

commands:
  demo   time DeepCache (fxcache.enable) against an uncached generation on the Stable Diffusion 1.5
         U-Net architecture with random weights, on CPU; `python -m fxcache demo --help` for options.
         Quick check: python -m fxcache demo --size 64 --steps 4"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a command; returns the exit code.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: python -m fxcache demo ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from fxcache.demo import main as demo_main  # imports diffusers only when asked to

        return demo_main(argv[1:])
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(USAGE)
        return 0
    what = f"unknown command {argv[0]!r}" if argv else "no command given"
    print(f"{USAGE}\n\npython -m fxcache: error: {what}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
