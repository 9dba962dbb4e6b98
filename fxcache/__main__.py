"""``python -m fxcache <command>``: the command-line entry point (``demo``, ``sd15`` and ``serve``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

USAGE = """\
usage: python -m fxcache {demo,sd15,serve} [options]

commands:
  demo   generate with fxcache's own trained model, uncached and with DeepCache at several settings;
         prints speed-ups, PSNR/SSIM against the uncached images and an FID-style score, and writes a
         PNG grid. `python -m fxcache demo --help` for options; `--quick` for a one-minute version.
  sd15   time DeepCache (fxcache.enable) against an uncached generation on the Stable Diffusion 1.5
         U-Net architecture with random weights; `python -m fxcache sd15 --help` for options.
  serve  serve the demo model under fxcache with Ray Serve (POST /generate, GET /healthz) until Ctrl-C or
         SIGTERM; needs `pip install "fxcache[serve]"`. `python -m fxcache serve --help` for options."""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a command; returns the exit code.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: python -m fxcache {demo,sd15,serve} ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from fxcache.demo.run import main as demo_main  # imports diffusers only when asked to

        return demo_main(argv[1:])
    if argv[:1] == ["sd15"]:
        from fxcache.demo.sd15 import main as sd15_main

        return sd15_main(argv[1:])
    if argv[:1] == ["serve"]:
        from fxcache.serve import main as serve_main  # imports Ray only when asked to

        return serve_main(argv[1:])
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(USAGE)
        return 0
    what = f"unknown command {argv[0]!r}" if argv else "no command given"
    print(f"{USAGE}\n\npython -m fxcache: error: {what}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
