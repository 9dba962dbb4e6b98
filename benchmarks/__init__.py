"""fxcache's benchmarks, run from the repository root as modules:

    python -m benchmarks.core      # eager: shallow/full step cost, a generation against the plain pipeline and
                                   # DeepCacheSDHelper (SD1.5 architecture, CPU); `make bench`
    python -m benchmarks.compile   # torch.compile: plain and fxcache, eager and compiled, and the helper (CPU or GPU)

``common`` holds what they share (machine description, timers, memory probes, report writers); the
``compile_*`` modules are the compile benchmark's parts. Results and how they were measured:
``benchmarks/RESULTS.md``. Benchmarks use fxcache's public API only.
"""
