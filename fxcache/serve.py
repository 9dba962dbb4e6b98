"""``python -m fxcache serve``: the shipped demo model under fxcache behind Ray Serve.

One Ray Serve application, ``fxcache``, with N replicas of the demo pipeline (diffusers ``DDIMPipeline`` over
``fxcache.demo.toy.load_demo_unet()``, 32x32 images) under :func:`fxcache.enable`:

- ``GET /healthz``: 200 once every replica of the application is running, else 503.
- ``POST /generate`` with a JSON object (:func:`parse_job` says which fields, defaults and limits): 200 with a
  PNG grid of the ``n`` images, and headers ``X-Fxcache-Seconds`` (from the replica receiving the request to
  its answer), ``X-Fxcache-Generate-Seconds`` (the pipeline calls that made its images, shared with the
  requests batched with it), ``X-Fxcache-Full-Steps`` / ``X-Fxcache-Shallow-Steps`` (of each generation that
  made its images), ``X-Fxcache-Batch`` (requests generated together with it, itself included) and
  ``X-Fxcache-Replica``. A bad request gets 400 and ``{"error": "..."}``.

Batching: concurrent requests reach a replica's ``@serve.batch`` queue (up to ``--max-batch`` requests); the
batch is grouped by settings (steps, branch, interval or schedule) and each group is generated together.

Same request, same bytes: every pipeline call generates exactly ``--chunk`` images, padding with throw-away
ones. On CPU the U-Net's float results for one image change with the batch size (oneDNN and BLAS pick other
kernels), but not with the image's position in a batch of fixed size nor with the other images in it, so a
fixed call size makes an image independent of what it was batched with. Each request draws its noise from
its own CPU ``torch.Generator`` seeded with ``seed`` (image ``i`` is its ``i``-th draw), and each pipeline
call is one fxcache generation (``with pipe.unet.generation():``), so no cache state crosses requests.

Ray is imported only by :func:`main` and :func:`app_builder`: ``import fxcache.serve`` needs neither Ray nor
diffusers.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_IMAGES", "MAX_STEPS", "BadRequest", "Job", "app_builder", "main", "parse_job", "png_grid"]

APP_NAME = "fxcache"
DEPLOYMENT_NAME = "FxcacheDemo"
MAX_STEPS = 200  # a 200-step uncached call of 4 images takes about 3 s on one CPU core
MAX_IMAGES = 16  # images per request
DEFAULTS: dict[str, int] = {"steps": 25, "branch": 0, "interval": 3, "n": 1}
BATCH_WAIT_S = 0.02  # how long a replica's batch queue waits for more requests after the first
_FIELDS = ("seed", "steps", "branch", "interval", "n", "schedule")


class BadRequest(ValueError):
    """A request the server refuses with 400; the message says what was wrong and what to send instead."""


@dataclass(frozen=True)
class Job:
    """One validated ``/generate`` request. ``interval`` is None when ``schedule`` (sorted full steps) is given."""

    seed: int
    steps: int = DEFAULTS["steps"]
    branch: int = DEFAULTS["branch"]
    interval: int | None = DEFAULTS["interval"]
    n: int = DEFAULTS["n"]
    schedule: tuple[int, ...] | None = None

    @property
    def settings(self) -> tuple[Any, ...]:
        """What must be equal for two jobs to share a pipeline call."""
        return (self.steps, self.branch, self.interval, self.schedule)


def _int_field(obj: dict[str, Any], name: str, lo: int, hi: int, hint: str) -> int:
    value = obj.get(name, DEFAULTS.get(name))
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name!r} must be an integer, got {json.dumps(value)}; {hint}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name}={value} is out of range: it must be in {lo}..{hi}; {hint}")
    return value


def parse_job(body: bytes | str, branches: int) -> Job:
    """Validate a ``/generate`` body for a model with ``branches`` skip connections; raises :class:`BadRequest`.

    Fields: ``seed`` (required, 0..2**63-1), ``steps`` (default 25, 1..200), ``branch`` (default 0,
    0..branches-1), ``interval`` (default 3, 1..200; 1 is uncached), ``n`` (default 1, images, 1..16), and
    ``schedule``: a list of the steps that run the full U-Net (``fxcache.full_steps``; step 0 always does),
    instead of ``interval``. Integers must be JSON integers (``true`` is not one).

    Example:
        >>> parse_job(b'{"seed": 7, "n": 2}', branches=8)
        Job(seed=7, steps=25, branch=0, interval=3, n=2, schedule=None)
        >>> parse_job('{"seed": 7, "steps": 10, "schedule": [0, 5, 2]}', branches=8).schedule
        (0, 2, 5)
        >>> parse_job('{"seed": 7, "branch": 8}', branches=8)
        Traceback (most recent call last):
        ...
        fxcache.serve.BadRequest: branch=8 is out of range: it must be in 0..7; this model has 8 skip connections...
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f'the body is not valid JSON ({e}); send an object such as {{"seed": 0}}') from None
    if not isinstance(obj, dict):
        raise BadRequest(f'the body must be a JSON object such as {{"seed": 0}}, got {json.dumps(obj)[:80]}')
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; the fields are {list(_FIELDS)}")
    if "seed" not in obj:
        raise BadRequest('"seed" is missing: every request names its seed, e.g. {"seed": 0}')
    seed = _int_field(obj, "seed", 0, 2**63 - 1, "pick any non-negative integer below 2**63")
    steps = _int_field(obj, "steps", 1, MAX_STEPS, f"the server's limit is {MAX_STEPS} denoising steps")
    skips = f"this model has {branches} skip connections (branches 0..{branches - 1}); 0 is the fastest"
    branch = _int_field(obj, "branch", 0, branches - 1, skips)
    n = _int_field(obj, "n", 1, MAX_IMAGES, f"ask for at most {MAX_IMAGES} images per request")
    if "schedule" not in obj:
        interval = _int_field(obj, "interval", 1, MAX_STEPS, "one full step every `interval` steps; 1 is uncached")
        return Job(seed, steps, branch, interval, n)
    if "interval" in obj:
        raise BadRequest('give either "interval" or "schedule" (the list of full steps), not both')
    full = obj["schedule"]
    if not isinstance(full, list) or not full or any(isinstance(s, bool) or not isinstance(s, int) for s in full):
        raise BadRequest(
            f'"schedule" must be a non-empty list of step numbers, e.g. [0, 5, 10], got {json.dumps(full)}'
        )
    if not all(0 <= s < steps for s in full):
        raise BadRequest(f'"schedule" steps must be in 0..{steps - 1} for steps={steps}, got {full}')
    return Job(seed, steps, branch, None, n, tuple(sorted(set(full))))


def png_grid(images: Any) -> bytes:
    """A PNG of ``images`` (numpy, ``n x H x W x 3``, floats in [0, 1]) on a grid ``ceil(sqrt(n))`` wide.

    Pixels are ``round(255 * x)``, as diffusers' ``numpy_to_pil``; free cells stay black.

    Example:
        >>> import numpy as np
        >>> png_grid(np.zeros((3, 4, 4, 3)))[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    import numpy as np
    from PIL import Image

    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate((images * 255).round().astype(np.uint8)):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Result:
    png: bytes = b""
    seconds: float = 0.0
    full: int = 0
    shallow: int = 0
    batch: int = 0
    error: str | None = None


class Replica:
    """One replica's pipeline and request handling (wrapped by ``serve.deployment`` in :func:`app_builder`)."""

    def __init__(self, compile: bool = False, max_batch: int = 8, chunk: int = 4, threads: int = 0) -> None:
        import torch
        from diffusers import DDIMPipeline

        import fxcache
        from fxcache.demo import toy
        from fxcache.demo.run import compile_spec

        if threads > 0:
            torch.set_num_threads(threads)
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        unet = toy.load_demo_unet()
        size = unet.config.sample_size
        # The number of skips, from the analysis itself (the demo U-Net has 8).
        self.branches = len(fxcache.explain(unet, torch.zeros(1, unet.config.in_channels, size, size), torch.tensor(1)))
        self._pipe = DDIMPipeline(unet=unet, scheduler=toy.demo_scheduler()).to(self._device)
        self._pipe.set_progress_bar_config(disable=True)
        self._compile = compile_spec(self._device) if compile else False
        self._chunk = chunk
        self._lock = threading.Lock()  # one pipeline call at a time: diffusers pipelines are not thread-safe
        self._batched = _serve().batch(max_batch_size=max_batch, batch_wait_timeout_s=BATCH_WAIT_S)(self._batch)
        self._run_group([Job(seed=0, steps=3)])  # warm-up: builds (and compiles) the default branch's graphs

    def _run_group(self, jobs: list[Job]) -> tuple[list[Any], float, int, int]:
        """Generate the images of ``jobs`` (equal settings) in calls of exactly ``chunk`` images."""
        import numpy as np
        import torch

        import fxcache

        first = jobs[0]
        schedule = fxcache.full_steps(list(first.schedule)) if first.schedule else None
        gens = [g for j in jobs for g in [torch.Generator().manual_seed(j.seed)] * j.n]  # one generator per request
        pad = (-len(gens)) % self._chunk
        gens += [torch.Generator().manual_seed(0) for _ in range(pad)]
        out, full, shallow = [], 0, 0
        start = time.perf_counter()
        with self._lock:
            fxcache.enable(
                self._pipe, branch=first.branch, interval=first.interval, schedule=schedule, compile=self._compile
            )
            unet = self._pipe.unet
            for i in range(0, len(gens), self._chunk):
                # Each call its own generation: batches run on varying worker threads, and a generation that is
                # dropped when its call ends leaves no cached feature behind (fxcache.generations).
                with unet.generation() as generation:
                    call = self._pipe(
                        batch_size=self._chunk, num_inference_steps=first.steps, generator=gens[i : i + self._chunk],
                        output_type="np",
                    )  # fmt: skip
                out.append(call.images)
                full, shallow = generation.state.generation_full_steps, generation.state.generation_shallow_steps
        images = np.concatenate(out)[: len(gens) - pad]
        at = np.cumsum([0] + [j.n for j in jobs])
        return [images[a:b] for a, b in zip(at[:-1], at[1:], strict=True)], time.perf_counter() - start, full, shallow

    def _run_batch(self, jobs: list[Job]) -> list[_Result]:
        results = [_Result() for _ in jobs]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.settings, []).append(i)
        for members in groups.values():
            try:
                images, seconds, full, shallow = self._run_group([jobs[i] for i in members])
                for i, imgs in zip(members, images, strict=True):
                    results[i] = _Result(png_grid(imgs), seconds, full, shallow, len(members))
            except Exception as e:  # one group's failure answers its own requests only
                for i in members:
                    results[i] = _Result(error=f"generation failed: {type(e).__name__}: {e}")
        return results

    async def _batch(self, jobs: list[Job]) -> list[_Result]:
        # In a worker thread, so that /healthz and bad requests are answered while a batch generates.
        return await asyncio.to_thread(self._run_batch, jobs)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        received = time.perf_counter()
        path, method = request.url.path.rstrip("/"), request.method
        if path.endswith("/healthz"):
            if method != "GET":
                return JSONResponse({"error": f"/healthz takes GET, not {method}"}, status_code=405)
            status = await asyncio.to_thread(_app_status)
            return JSONResponse({"status": status}, status_code=200 if status == "RUNNING" else 503)
        if not path.endswith("/generate"):
            return JSONResponse({"error": f"no route {path!r}: use POST /generate or GET /healthz"}, status_code=404)
        if method != "POST":
            return JSONResponse({"error": f"/generate takes POST with a JSON body, not {method}"}, status_code=405)
        try:
            job = parse_job(await request.body(), self.branches)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        result: _Result = await self._batched(job)
        if result.error is not None:
            return JSONResponse({"error": result.error}, status_code=500)
        headers = {
            "X-Fxcache-Seconds": f"{time.perf_counter() - received:.4f}",
            "X-Fxcache-Generate-Seconds": f"{result.seconds:.4f}",
            "X-Fxcache-Full-Steps": str(result.full),
            "X-Fxcache-Shallow-Steps": str(result.shallow),
            "X-Fxcache-Batch": str(result.batch),
            "X-Fxcache-Replica": _serve().get_replica_context().replica_id.unique_id,
        }
        return Response(result.png, media_type="image/png", headers=headers)


def _serve() -> Any:
    from ray import serve

    return serve


def _app_status() -> str:
    app = _serve().status().applications.get(APP_NAME)
    return app.status if app is not None else "NOT_STARTED"


def _flag(value: object) -> bool:
    # `serve run fxcache.serve:app_builder compile=false` passes the string "false"
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def app_builder(args: dict[str, Any]) -> Any:
    """The Ray Serve application (``serve run fxcache.serve:app_builder``, KubeRay's ``import_path``).

    ``args``: ``replicas`` (default: Serve's, 1, or a config file's ``autoscaling_config``), ``compile``
    (False), ``max_batch`` (8), ``chunk`` (4), ``threads`` (torch threads per replica and the CPUs it reserves;
    0 for torch's default and 1 CPU). A deployment config given to Serve (``num_replicas``,
    ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests``) overrides these.
    """
    serve = _serve()
    max_batch, threads = int(args.get("max_batch", 8)), int(args.get("threads", 0))
    options: dict[str, Any] = {"name": DEPLOYMENT_NAME, "ray_actor_options": {"num_cpus": max(threads, 1)}}
    options["max_ongoing_requests"] = 2 * max_batch  # one batch generating, the next one filling
    if "replicas" in args:  # else Serve's default of 1, or the autoscaling_config of a Serve config file
        options["num_replicas"] = int(args["replicas"])
    deployment = serve.deployment(Replica, **options)
    return deployment.bind(
        compile=_flag(args.get("compile", False)), max_batch=max_batch, chunk=int(args.get("chunk", 4)), threads=threads
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fxcache serve",
        description="Serve the shipped demo model under fxcache with Ray Serve (POST /generate, GET /healthz).",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1, help="pipeline replicas (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile fxcache's graphs (slow start)")
    p.add_argument("--max-batch", type=int, default=8, help="requests per dynamic batch (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=4, help="images per pipeline call, padded (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per replica (default: CPUs / replicas)")
    p.add_argument("--address", help="connect to this Ray cluster (e.g. ray://head:10001 or auto) instead of a new one")
    p.add_argument("--temp-dir", help="the local Ray instance's session directory (default: Ray's own)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Start Ray and the application, serve until SIGINT/SIGTERM, then shut both down; returns the exit code."""
    args = _parser().parse_args(argv)
    for name in ("replicas", "max_batch", "chunk"):
        if getattr(args, name) < 1:
            _parser().error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.address:
        # Ray turns a loopback node address into the machine's reachable one unless clusters are off; with
        # them off, every Ray process of this local instance listens on 127.0.0.1 only. Read at `import ray`.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if args.address:
        ray.init(address=args.address, logging_level="WARNING")
    else:
        ray.init(include_dashboard=False, _temp_dir=args.temp_dir, logging_level="WARNING")
    # After ray.init, which installs its own handler. SIGINT too: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    code = 0
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        config = {"replicas": args.replicas, "compile": args.compile, "max_batch": args.max_batch}
        config |= {"chunk": args.chunk, "threads": threads}
        serve.run(app_builder(config), name=APP_NAME, route_prefix="/")
        print(
            f"fxcache serve: ready on http://{args.host}:{args.port} ({args.replicas} replicas, {threads} torch "
            f"threads each); POST /generate, GET /healthz; Ctrl-C or SIGTERM stops it",
            flush=True,
        )
        while True:
            time.sleep(3600)  # the signal handlers raise KeyboardInterrupt here
    except KeyboardInterrupt:
        print("fxcache serve: stopping", flush=True)
    except Exception as e:  # startup failures: say so, still shut down below
        print(f"fxcache serve: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.address:
            serve.delete(APP_NAME)  # someone else's cluster: remove our application only
        else:
            serve.shutdown()
        ray.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
