"""Bias of the k-NN divergence estimator against the exact KL, by dimension and particles.

Linear Gaussian task, coupled populations (the partner excluded from each student's
search), alpha = 0 (student broader than its teacher) and alpha = 1 with a colder
student (student narrower). Writes benchmarks/results/knn_bias.md.

    python benchmarks/knn_bias.py            # about two minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import kdsim
from kdsim import evaluation

SHAPES = [(2, 1), (2, 2), (4, 2), (9, 2), (8, 4)]       # (d, k): parameter dimension d * k
PARTICLES = [500, 3000]
REGIMES = {"alpha=0 (student broader)": {"alpha": 0.0},
           "alpha=1, gamma_S=4 gamma_T (student narrower)": {"alpha": 1.0, "langevin": {"gamma": 1024.0}}}


def measure(d: int, k: int, P: int, student: dict, E: int = 4) -> dict:
    run = kdsim.run_populations({"task": {"d": d, "k": k, "n": 64}, "teacher": {"num_steps": 500},
                                 "student": student, "num_datasets": E, "num_particles": P,
                                 "seed": 3})
    ctx, _, _ = evaluation.context(run)
    exact = evaluation.closed_form_columns(ctx)[0]["kl_exact"]
    cols, _ = evaluation.divergence_columns(ctx)
    return {"exact": exact.mean(), "knn": cols["kl_knn"].mean(),
            "knn_se": np.sqrt(np.sum(cols["kl_knn_se"] ** 2)) / E,
            "gauss": cols["kl_gaussian_full"].mean()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "knn_bias.md"))
    args = ap.parse_args()
    t0 = time.time()
    lines = ["# k-NN KL estimator: bias against the exact KL_D", "",
             f"Machine: {platform.machine()} {platform.processor() or ''}, "
             f"{os.cpu_count()} CPUs; kdsim {kdsim.io.kdsim_version()}. "
             "Linear Gaussian task, n = 64, 500 teacher and student steps, 4 datasets per "
             "row (means), k = 5, each student's partner excluded from its search. "
             "`gaussian_full` is the moment-matched Gaussian estimate (NaN when P < 5 p).", "",
             "Reproduce: `python benchmarks/knn_bias.py`.", ""]
    for regime, student in REGIMES.items():
        lines += [f"## {regime}", "",
                  "| dim p = d k | particles | exact KL | k-NN | k-NN - exact | k-NN se | gaussian_full |",
                  "|---|---|---|---|---|---|---|"]
        for d, k in SHAPES:
            for P in PARTICLES:
                m = measure(d, k, P, student)
                lines.append(f"| {d * k} | {P} | {m['exact']:.3f} | {m['knn']:.3f} | "
                             f"{m['knn'] - m['exact']:+.3f} | {m['knn_se']:.3f} | {m['gauss']:.3f} |")
        lines.append("")
    lines += ["Reading: the k-NN estimate is usable in 2-4 dimensions when the student is not "
              "broader than the teacher; with a broader student (alpha < 1, the usual case) its "
              "tails converge slowly and it is biased low, and from about 8 dimensions it is "
              "far off either way (SPEC §8). kdsim reports it for comparison only; bounds use "
              "`exact` (or `girsanov`).", "", f"Wall time: {time.time() - t0:.0f} s."]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
