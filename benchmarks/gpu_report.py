"""The GPU check's report: Dynamo/Inductor counters between two moments, and the printed tables."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["counters_diff", "counters_now", "report"]


def counters_now() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters

    return {ns: dict(c) for ns, c in counters.items()}


def counters_diff(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out = {}
    for ns, c in b.items():
        if ns not in ("stats", "inductor", "aot_autograd", "recompiles", "frames"):
            continue  # per-shape matmul tallies and the like
        d = {k: v - a.get(ns, {}).get(k, 0) for k, v in c.items() if isinstance(v, int)}
        d = {k: v for k, v in d.items() if v}
        if d:
            out[ns] = d
    return out


def report(res: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".1f") -> str:
        return "" if v is None else format(v, spec)

    lines = [
        f"# GPU check: {res['env'].get('gpu', 'CPU')}, torch {res['env']['torch']}, {res['scenario']}",
        "",
        "| method | N | gen ms | it/s | full ms | shallow ms | f b2b | f gen | % ideal (b2b) | % ideal (gen) "
        "| vs plain | vs helper | PSNR dB |",
        "|" + "---|" * 13,
    ]
    for name, rows in res["methods"].items():
        for row in rows.values():
            pct = [row.get(f"fraction_of_ideal_{k}") for k in ("f_b2b", "f_gen")]
            lines.append(
                f"| {name} | {row['N']} | {row['gen_s'] * 1e3:.1f} | {row['steps_per_s']:.1f} "
                f"| {f(row.get('full_ms'), '.2f')} "
                f"| {f(row.get('shallow_ms'), '.2f')} | {f(row.get('f_b2b'), '.3f')} | {f(row.get('f_gen'), '.3f')} "
                f"| {f(pct[0] and 100 * pct[0], '.0f')} | {f(pct[1] and 100 * pct[1], '.0f')} "
                f"| {f(row.get('speedup_vs_plain'), '.2f')} | {f(row.get('speedup_vs_helper'), '.2f')} "
                f"| {f(row.get('psnr_db'))} |"
            )
    for name, rows in res["methods"].items():
        row = next(iter(rows.values()))
        for call in ("full_call", "shallow_call"):
            if call in row:
                host, gpu = row[call]["host_us"], row[call].get("gpu_us")
                share = f" (host = {100 * host / gpu:.0f}% of GPU time)" if gpu else ""
                lines.append(f"{name} {call}: host {host:.0f} us, GPU {f(gpu, '.0f')} us{share}")
        if "host_us" in row:
            lines.append(f"{name} call: host {row['host_us']:.0f} us, GPU {f(row.get('gpu_us'), '.0f')} us")
        if "max_abs_diff_vs_helper" in row:
            lines.append(
                f"{name} vs DeepCacheSDHelper, max abs latent diff: "
                + ", ".join(f"N={r['N']}: {r.get('max_abs_diff_vs_helper')}" for r in rows.values())
            )
    if "runtime_overhead_us" in res:
        o = res["runtime_overhead_us"]
        lines.append(
            f"fxcache runtime per call (eager, minimal U-Net): {o['added']:.1f} us added "
            f"({o['module']:.1f} us through the module, {o['graph']:.1f} us the shallow graph alone)"
        )
    for name, c in res.get("counters", {}).items():
        lines.append(f"{name} counters: {json.dumps(c)}")
    for k, t in res.get("targets", {}).items():
        lines.append(f"target {k} >= {t['min']}: {f(t['value'], '.3f')} {'PASS' if t['pass'] else 'FAIL'}")
    lines += [f"skipped {k}: {v}" for k, v in res["skipped"].items()]
    lines += [f"error {k}: {v}" for k, v in res["errors"].items()]
    return "\n".join(lines)
