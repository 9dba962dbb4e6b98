"""Compiled DeepCache benchmark: the plain U-Net eager and compiled, DeepCacheSDHelper, fxcache eager and compiled.

    python -m benchmarks.compile [--device auto|cpu|cuda] [--out DIR] [--quick]
    python -m benchmarks.compile --device cpu --size 128 --intervals 3,5 --branches 0   # overrides
    python -m benchmarks.compile --no-freezing  # the CPU scenario without Inductor's freezing

(from the repository root). The parts: ``compile_scenario`` (methods, models, targets, definitions, the
:class:`Scenario`), ``compile_methods`` (setting the methods up and measuring them), ``compile_report``
(rows, targets, the report and the files).

One process, one pipeline, the same prompt embeddings and the same initial noise for five methods:

    plain eager        the U-Net as built (the reference every PSNR is measured against)
    plain compiled     torch.compile(unet, mode=M, fullgraph=True, dynamic=False); with CUDA graphs each call
                       first marks a new step (torch.compiler.cudagraph_mark_step_begin), as fxcache does
    DeepCacheSDHelper  DeepCache's reference helper (eager), at every N and branch
    fxcache eager      fxcache.enable(pipe, branch=B, interval=N)
    fxcache compiled   fxcache.enable(pipe, branch=B, interval=N, compile=M)

M is one torch.compile mode for both compiled methods: "reduce-overhead" (CUDA graphs) on CUDA, Inductor's
"default" with freezing (weights as constants) on CPU (``--mode`` and ``--[no-]freezing`` change it for both).
fxcache compiles one full and one shallow graph per branch and keeps them across N (only the schedule changes),
so a run compiles 1 + 2 x branches graphs.

Scenarios (a :class:`Scenario` in, :class:`Row` s out; see :func:`default_scenario`):

* GPU, as issue 3 sets it: the SD1.5 U-Net architecture with random weights, fp16, 512 px (64x64 latents),
  batch 1 with classifier-free guidance (the U-Net sees batch 2), 50 DDIM steps, N in {3, 5}, branch in {0, 1}.
* CPU: a reduced scenario that fits a few minutes on 2 cores (fp32, 10 steps, a smaller model; the run prints
  which). Inductor's C++ compile of the full SD1.5 graph alone takes minutes there.

Every method is set up with one warm-up generation (which captures and compiles: the one-time cost is that
generation minus its steady-state cost) and measured once right away (round 1). Then rounds 2..``gen_reps``
are interleaved: in each, every method generates once at every N, then its full and shallow step times are
taken (the U-Net called directly with the arguments the pipeline passes, K calls between two device syncs after
warm-up calls that also record CUDA graphs). Reported per method and (N, branch): medians of the step times and
of the end-to-end generation time, effective steps/s, speedup against plain eager, plain compiled and the helper
at the same N and branch and against the ideal N / (1 + (N - 1) f), the one-time cost, peak memory, and the PSNR
of the latents against plain eager's. f, the shallow/full ratio, is reported twice: from the back-to-back step
times above, and from step times inside real generations (``f_gen``: a callback after each pipeline step takes a
synced timestamp), with the ideal speedup and its fraction computed from each. Interleaving matters on a shared
CPU, whose speed drifts by tens of percent over minutes.

Targets, printed PASS/FAIL (benchmarks, not tests: a FAIL does not change the exit status):

* CUDA: fxcache compiled at N=5, branch 0 reaches >= 90% of the ideal speedup over plain compiled (f from its own
  compiled shallow and full step times), is >= 2x faster end-to-end than DeepCacheSDHelper, and runs >= 300
  effective steps/s at 512 px.
* CPU: fxcache compiled is faster end-to-end than fxcache eager and than DeepCacheSDHelper at each N and branch.

Writes ``<out>/<run>.json``, ``.csv`` and ``.png`` (speedup against N, one line per method; needs matplotlib),
each naming the device, torch and triton versions, dtype, shapes and steps. The exit status is 1 when a
measurement raised (its traceback is printed and the run goes on), else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import log
from benchmarks.compile_methods import Bench
from benchmarks.compile_report import check_targets, environment, make_rows, report, write_files
from benchmarks.compile_scenario import MODELS, SCHEDULES, Scenario, default_scenario
from fxcache.demo.sd15 import quiet_hf_logs

# -- command line -----------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,5; got {text!r}") from exc


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SCHEDULES]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown schedule(s) {bad or text!r}; use some of {', '.join(SCHEDULES)}")
    return ("uniform", *(k for k in kinds if k != "uniform"))


def parse(argv: list[str] | None) -> tuple[Scenario, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when available, else cpu (default auto)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for JSON, CSV and PNG")
    parser.add_argument("--quick", action="store_true", help="a smoke run: smaller sizes, fewer steps, one branch")
    parser.add_argument("--model", choices=sorted(MODELS), help="override the scenario's model")
    parser.add_argument("--size", type=int, help="pixels, multiple of 64 (latents are size/8)")
    parser.add_argument("--steps", type=int, help="DDIM steps per generation")
    parser.add_argument("--intervals", type=_ints, help="N values, comma-separated, each >= 2 (e.g. 3,5)")
    parser.add_argument("--branches", type=_ints, help="branches, comma-separated (e.g. 0,1)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="override the dtype")
    parser.add_argument("--mode", help="torch.compile mode for both compiled methods (default: per device)")
    parser.add_argument("--freezing", action=argparse.BooleanOptionalAction, default=None,
                        help="Inductor's freezing (weights as constants) for both compiled methods (default: on for "
                        "the CPU scenario, off on CUDA)")  # fmt: skip
    parser.add_argument("--step-reps", type=int, help="U-Net calls per step-time measurement")
    parser.add_argument("--gen-reps", type=int, help="timed generations per method, N and branch (median)")
    parser.add_argument(
        "--schedules",
        type=_kinds,
        help=f"fxcache schedules, comma-separated, from {', '.join(SCHEDULES)} (default uniform)",
    )
    parser.add_argument("--budget-s", type=float, help="skip remaining branches past this many seconds (0: none)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Inductor's usual cache folder (default: a fresh temporary one, so compile times "
                        "are cold)")  # fmt: skip
    a = parser.parse_args(argv)
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False). The GPU "
                     "scenario needs one; run with --device cpu (or auto) for the reduced CPU scenario.")  # fmt: skip
    sc = default_scenario(device, a.quick)
    names = ("model", "size", "steps", "intervals", "branches", "dtype", "mode", "freezing", "step_reps", "gen_reps",
             "budget_s", "schedules")  # fmt: skip
    overrides = {k: getattr(a, k) for k in names if getattr(a, k) is not None}
    sc = dataclasses.replace(sc, **overrides)
    from torch._inductor import list_mode_options

    if sc.size < 64 or sc.size % 64:
        parser.error(f"--size {sc.size}: use a multiple of 64 (latents are size/8 and must be a multiple of 8)")
    if sc.steps < 2 or not sc.intervals or min(sc.intervals) < 2 or not sc.branches or min(sc.branches) < 0:
        parser.error("--steps must be >= 2, every N >= 2 (N=1 is the plain model, always measured) and branches >= 0")
    if sc.step_reps < 1 or sc.gen_reps < 1:
        parser.error("--step-reps and --gen-reps must be >= 1")
    if sc.mode not in list_mode_options():
        parser.error(f"--mode {sc.mode!r} is not a torch.compile mode; use one of {', '.join(list_mode_options())}")
    if device == "cpu" and sc.dtype == "float16":
        parser.error("--dtype float16 on CPU: use float32 (or bfloat16)")
    return sc, a


def main(argv: list[str] | None = None) -> int:
    sc, a = parse(argv)
    cache_dir = None
    if not a.warm_cache:
        # Cold compile times: nothing from an earlier run (or an earlier test) may be served from Inductor's caches.
        cache_dir = tempfile.mkdtemp(prefix="fxcache_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    quiet_hf_logs()
    if sc.freezing:
        # torch.compile(options={"freezing": True}) alone does not freeze: Dynamo reads the global flag. fxcache
        # sets it around its own graphs' calls; the plain compiled U-Net needs it set here.
        import torch._inductor.config

        torch._inductor.config.freezing = True
    try:
        env = environment(sc)
        log(f"{sc.name}: {MODELS[sc.model]} on {env['device_name']}")
        log(f"torch {env['torch']}, triton {env['triton']}, {env['torch_threads']} CPU threads; Inductor cache "
             f"{'as usual' if cache_dir is None else 'fresh (cold compile times)'}")  # fmt: skip
        if sc.device == "cpu" and env["load_average_1min_at_start"] > 0.5:
            log(f"warning: load average {env['load_average_1min_at_start']:.2f}: other processes are using the CPU, "
                 "so these timings will be noisy")  # fmt: skip
        start = time.perf_counter()
        log("building the model and the pipeline")
        bench = Bench(sc)

        def checkpoint() -> None:
            rows = make_rows(bench)
            write_files(a.out, sc, env, bench, rows, check_targets(sc, rows), time.perf_counter() - start, chart=False)

        bench.checkpoint = checkpoint
        try:
            bench.run()
        except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: report what was measured
            bench.notes.append(
                f"interrupted after {time.perf_counter() - start:.0f} s; what was not measured by then is missing"
            )
            bench.log(bench.notes[-1])  # each method's `with` block has put the plain U-Net back
        total_s = time.perf_counter() - start
        env = {**environment(sc, bench), "load_average_1min_at_start": env["load_average_1min_at_start"]}
        rows = make_rows(bench)
        checks = check_targets(sc, rows)
        log("")
        print(report(sc, env, bench, rows, checks, total_s))
        paths = write_files(a.out, sc, env, bench, rows, checks, total_s)
        print("\nwrote " + ", ".join(map(str, paths)), flush=True)
        return 1 if bench.errors else 0
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
