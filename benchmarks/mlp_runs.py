"""The neural tasks at the issue's scale: teacher width 64, students of width 8 and 64,
16 datasets x 64 particles, default 2000 + 2000 Langevin steps (plus the scratch student).

Writes benchmarks/results/mlp_runs.md with the wall time of each phase and the headline
numbers of each run.

    python benchmarks/mlp_runs.py          # about 15 minutes on 2 CPU cores
    python benchmarks/mlp_runs.py --quick  # 200 steps
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax

import kdsim
from kdsim.result import markdown

ROWS = ["gen_T", "gen_S", "gen_S_scratch", "test_loss_T", "test_loss_S", "test_loss_S_scratch",
        "kl_girsanov", "klpred_convexity", "B0_upper", "B1_upper", "B3_upper", "B0_lower",
        "B2_lower", "gen_S_01", "B1_upper_01"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mlp_runs.md"))
    args = ap.parse_args()
    steps = 200 if args.quick else 2000
    lines = ["# Neural tasks at scale", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} on "
             f"{jax.devices()[0].platform}; kdsim {kdsim.io.kdsim_version()}. 16 datasets x 64 "
             f"particles, teacher width 64, {steps} + {steps} steps, scratch student on, "
             "Girsanov on where it applies (same width).", "",
             f"Reproduce: `python benchmarks/mlp_runs.py{' --quick' if args.quick else ''}`.", "",
             "| task | student width | total s | teacher s | student s | scratch s | evaluation s |",
             "|---|---|---|---|---|---|---|"]
    details = []
    for task in ("mlp_regression", "mlp_classification"):
        for width in (8, 64):
            t0 = time.perf_counter()
            res = kdsim.simulate({"task": {"name": task}, "teacher": {"num_steps": steps},
                                  "student": {"model": {"width": width}},
                                  "num_datasets": 16, "num_particles": 64})
            total = time.perf_counter() - t0
            ph = res.meta["phase_seconds"]
            ev = total - res.meta["engine_seconds"]
            lines.append(f"| {task} | {width} | {total:.0f} | {ph['teacher']:.0f} | "
                         f"{ph['student']:.0f} | {ph.get('scratch', float('nan')):.0f} | {ev:.0f} |")
            rows = [r for r in ROWS if r in res.summary.index]
            details += [f"### {task}, student width {width}", "",
                        markdown(res.summary.loc[rows, ["mean", "se", "ci_low", "ci_high"]]), ""]
            print(lines[-1], flush=True)
            rates = []
            for c in res.per_dataset.columns:
                if c.removesuffix("_01").endswith("_valid"):
                    v = res.per_dataset[c].to_numpy(dtype=float, na_value=float("nan"))
                    if (v == v).any():
                        rates.append(f"{c.replace('_valid', '')} {v[v == v].mean():.2f}")
            details += ["validity rates (where computed): " + (", ".join(rates) or "none: "
                        "no parameter-space KL for a narrower student"), ""]
    text = "\n".join(lines + [""] + details) + "\n"
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
