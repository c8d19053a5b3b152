"""The projected-teacher reference (B0_proj_upper) in the rank-compression regime.

The rank regime of benchmarks/bound_tightness.py (linear task, d = 8, k = 4, n = 64,
alpha = 0.3, 32 datasets, 2000 steps): for each student rank r, the pooled DV bound with
the teacher projected on the student's subspace as reference (kdsim/reference_bounds.py,
finite-time closed forms) against the exact gap gen_S_exact. Writes
benchmarks/results/proj_reference.md.

    python benchmarks/proj_reference.py      # under a minute on 2 CPU cores
"""

from __future__ import annotations

import os
import time

import numpy as np

import kdsim
from kdsim import closed_form, streams
from kdsim.config import resolve
from kdsim.reference_bounds import projected_reference
from kdsim.tasks import linear_gaussian as lg

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = [1, 2, 3, 4, 6, 8]


def main() -> None:
    t0 = time.time()
    lines = ["# A KD reference inside the student's class: B0_proj_upper against the rank", "",
             "`python benchmarks/proj_reference.py`: linear task, d = 8, k = 4, n = 64, "
             "alpha = 0.3, 32 datasets, 2000 steps (the rank regime of "
             "`bound_tightness.py`). Reference kernel: the teacher projected on the student's "
             "subspace, `W_T Pi Pi^T`; every quantity a finite-time closed form. Pooled bound "
             "`E gen_proj + min_lam (E KL + E Lambda'(lam))/lam` against the pooled exact gap.",
             "", "| r | E KL(Q \\|\\| P_proj) (nats) | E gen_proj | pooled B0_proj_upper | "
             "gen_S_exact | ratio | per-dataset median ratio | max ratio | valid (all datasets) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in RANKS:
        cfg = kdsim.SimConfig.from_dict({"task": {"d": 8, "k": 4}, "num_datasets": 32,
                                         "teacher": {"num_steps": 2000},
                                         "student": {"alpha": 0.3, "rank": r}})
        res = resolve(cfg)
        st, nm = res.static, res.numeric
        data = lg.make_data(streams.root_key(cfg.seed), np.arange(32), n=st.n, d=st.d, k=st.k,
                            rank=st.rank, full_student=st.full_student, noise=nm.noise,
                            input_scale=nm.input_scale, input_decay=nm.input_decay,
                            signal_decay=nm.signal_decay)
        p = projected_reference(closed_form.finite_time(data, st, nm), data)
        ratio = p.B0_upper / p.truth
        lines.append(f"| {r} | {p.kl.mean():.3f} | {p.gen_ref.mean():.4f} | {p.pooled_B0_upper:.4f} | "
                     f"{p.pooled_truth:.4f} | {p.pooled_B0_upper / p.pooled_truth:.3f} | "
                     f"{np.median(ratio):.3f} | {ratio.max():.3f} | {bool(np.all(p.B0_upper >= p.truth))} |")
        print(lines[-1], flush=True)
    lines += ["", "For comparison, `bound_tightness.md` reports the pooled function-space F_B0 "
              "bounds (the only finite KD bounds for r < d with the teacher as reference) at "
              "24.7 / 20.9 / 14.8 for r = 1 / 2 / 4 against their own truths, the noisy "
              "predictors' gaps 0.13 / 0.14 / 0.19 (Monte Carlo populations of the same "
              "configs): vacuous, where the projected reference is within 15%. At r = d the reference is the teacher itself "
              "and the row is the ordinary B0 of the exact KL.", "",
              f"Total {time.time() - t0:.0f} s."]
    with open(os.path.join(HERE, "results", "proj_reference.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
