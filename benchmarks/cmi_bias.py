"""CMI bounds of the supersample design against M x P: plug-in MI, its bias, the bounds.

For each regime and each (masks M, particles P), one supersample run; the table gives
the mean plug-in MI per pair (f, e, ld), the same MI with each mask paired with another
mask's particles (true MI 0: the plug-in bias), every CMI bound and the truth (the
student's mean gap on the same bounded loss). Writes benchmarks/results/cmi_bias.md.

    python benchmarks/cmi_bias.py            # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import kdsim
from kdsim import evaluation_cmi as ec

REGIMES = {
    "linear, d=4, n=16, clip 1": {"task.d": 4, "task.k": 1, "task.n": 16, "teacher.num_steps": 300,
                                  "estimators.loss_clip": 1.0},
    "planted classification, d=4, n=16": {
        "task.name": "mlp_classification", "task.d": 4, "task.n": 16, "task.n_test": 1024,
        "teacher.model.width": 16, "student.model.width": 8, "teacher.num_steps": 300,
        "teacher.step_size": 0.01, "student.alpha": 0.5},
}
DESIGNS = [(16, 8), (16, 32), (64, 8), (64, 32)]        # (M, P)
ROWS = ["fcmi_upper", "ecmi_upper", "ldcmi_upper", "ecmi_kl_upper", "ldcmi_kl_upper",
        "ldcmi_fast_upper"]


def measure(regime: dict, M: int, P: int, S: int) -> dict:
    cfg = {**regime, "num_datasets": S, "num_particles": P, "estimators.supersample": True,
           "estimators.masks": M, "estimators.scratch": False, "seed": 5}
    run = kdsim.run_populations(cfg, progress=False)
    r, truth_s = ec.bounds_and_truth(ec.student_arrays(run))
    names = {"fcmi_upper": r.fcmi, "ecmi_upper": r.ecmi, "ldcmi_upper": r.ldcmi,
             "ecmi_kl_upper": r.ecmi_kl, "ldcmi_kl_upper": r.ldcmi_kl,
             "ldcmi_fast_upper": r.ldcmi_fast}
    out = {"truth": float(truth_s.mean()), "mi": list(np.asarray(r.mi)),
           "null": list(np.asarray(r.mi_null))}
    out.update({k: float(v) for k, v in names.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supersamples", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "cmi_bias.md"))
    args = parser.parse_args()
    t0 = time.time()
    lines = ["# CMI bounds against M x P (plug-in MI and its bias)", "",
             f"`python benchmarks/cmi_bias.py --supersamples {args.supersamples}` "
             f"({platform.machine()}, {os.cpu_count()} CPUs). MI in nats, mean per pair; "
             "*null* = the same plug-in MI with each mask paired with another mask's "
             "particles (true MI 0): the plug-in bias on the same samples. Bounds and truth "
             "in loss units.", ""]
    for name, regime in REGIMES.items():
        lines += [f"## {name}", "",
                  "| M | P | M x P | MI f / e / ld | null MI f / e / ld | " + " | ".join(ROWS)
                  + " | truth |", "|" + "---|" * (len(ROWS) + 6)]
        for M, P in DESIGNS:
            r = measure(regime, M, P, args.supersamples)
            fmt = lambda v: " / ".join("-" if np.isnan(x) else f"{x:.4f}" for x in v)
            lines.append(f"| {M} | {P} | {M * P} | {fmt(r['mi'])} | {fmt(r['null'])} | "
                         + " | ".join("-" if np.isnan(r[k]) else f"{r[k]:.3f}" for k in ROWS)
                         + f" | {r['truth']:.3f} |")
            print(lines[-1], flush=True)
        lines.append("")
    lines.append(f"Total {time.time() - t0:.0f} s.")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
