"""Compile cost of a default ``simulate`` in a fresh process (issue 16).

Runs ``kdsim.simulate(config)`` twice in this (fresh) process and reports the seconds
JAX spent tracing, lowering and compiling (``jax.monitoring`` duration events) during
each call, the number of programs compiled, and each call's stage timings. The second
call compiles nothing new when every program is reused, so ``first - second`` is the
one-off cost a fresh process pays.

    python benchmarks/compile_time.py [--config '{"num_datasets": 7}'] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import jax

import kdsim

EVENTS = {"/jax/core/compile/backend_compile_duration": "backend_compile",
          "/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="{}", help="a JSON config mapping (default: the default config)")
    ap.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = ap.parse_args()
    cfg = json.loads(args.config)
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def listen(event, duration, **_):
        if event in EVENTS:
            seconds[EVENTS[event]] += duration
            counts[EVENTS[event]] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    out = []
    for call in ("first", "second"):
        seconds.clear()
        counts.clear()
        t0 = time.perf_counter()
        res = kdsim.simulate(cfg, progress=False)
        wall = time.perf_counter() - t0
        row = {"call": call, "wall_s": wall, **{f"{k}_s": seconds[k] for k in EVENTS.values()},
               "programs_compiled": counts["backend_compile"],
               "timings": res.meta["timings"]}
        out.append(row)
        print(f"{call}: wall {wall:.2f} s; compile {seconds['backend_compile']:.2f} s in "
              f"{counts['backend_compile']} programs, trace {seconds['trace']:.2f} s, lower "
              f"{seconds['lower']:.2f} s; stages " +
              ", ".join(f"{k} {v:.2f}" for k, v in res.meta["timings"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
