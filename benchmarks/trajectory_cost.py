"""Cost of the trajectory bounds: a default ``kdsim.simulate`` with and without them.

One process; each variant runs once to warm up (compilation), then ``--repeats`` timed
runs alternate between the two; the ratio of the medians is reported. Usage:

    PYTHONPATH=. python benchmarks/trajectory_cost.py --repeats 3 \
        --out benchmarks/results/trajectory_cost_cpu.md [--set trajectory_examples=8]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import kdsim


def _config(on: bool, extra: dict) -> dict:
    est = {"trajectory_bounds": on, **(extra if on else {})}
    return {"estimators": est}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[],
                    help="extra estimators field for the 'on' run, e.g. trajectory_examples=8")
    args = ap.parse_args()
    extra = {}
    for item in args.set:
        key, value = item.split("=")
        extra[key] = None if value == "null" else int(value)
    times = {True: [], False: []}
    for on in (True, False):                      # warm-up: compile both
        kdsim.simulate(_config(on, extra), progress=False)
    engine = {True: [], False: []}
    for _ in range(args.repeats):
        for on in (True, False):
            t0 = time.perf_counter()
            res = kdsim.simulate(_config(on, extra), progress=False)
            times[on].append(time.perf_counter() - t0)
            engine[on].append(res.meta["engine_seconds"])
    med = {on: float(np.median(v)) for on, v in times.items()}
    eng = {on: float(np.median(v)) for on, v in engine.items()}
    ratio = med[True] / med[False]
    lines = [
        "# Cost of the trajectory bounds (default `kdsim.simulate`, CPU)",
        "",
        f"Command: `PYTHONPATH=. python benchmarks/trajectory_cost.py --repeats {args.repeats}"
        + "".join(f" --set {s}" for s in args.set) + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared); "
        "default config (linear task d = 8, k = 2, n = 64, 16 datasets x 256 particles, "
        "2000 + 2000 steps, scratch student on), one process, each variant warmed up once, "
        f"then {args.repeats} timed runs alternating; medians.",
        "",
        "| variant | simulate (s) | engine (s) | runs (s) |",
        "|---|---|---|---|",
        f"| trajectory_bounds = true {extra or ''} | {med[True]:.2f} | {eng[True]:.2f} | "
        + ", ".join(f"{t:.2f}" for t in times[True]) + " |",
        f"| trajectory_bounds = false | {med[False]:.2f} | {eng[False]:.2f} | "
        + ", ".join(f"{t:.2f}" for t in times[False]) + " |",
        "",
        f"Ratio (with / without): **{ratio:.2f}x** (limit 1.5x).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
