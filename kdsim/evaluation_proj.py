"""The ``*_proj`` columns and row of rank-r linear students (SPEC §10, last part).

A KD reference inside the student's class (:mod:`kdsim.reference_bounds`): the teacher
projected on the student's subspace. On the linear task every ingredient is a
finite-time closed form, so the bound is checked against ``gen_S_exact`` exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import closed_form
from .reference_bounds import projected_reference


def proj_evaluation(run: Any) -> tuple[dict[str, np.ndarray], pd.DataFrame, list[str]] | None:
    """Per-dataset ``kl_proj``, ``gen_proj``, ``B0_proj_upper`` (+ ``_tightness``,
    ``_valid``), the pooled row ``B0_proj_upper`` and a note; None where it does not apply
    (tasks other than the linear one, full-rank students: their B0 already uses the
    teacher itself)."""
    st, nm = run.resolved.static, run.resolved.numeric
    if st.task != "linear_gaussian" or st.full_student:
        return None
    p = projected_reference(closed_form.finite_time(run.data, st, nm), run.data)
    # closed forms on both sides: a bound holds up to float64 rounding
    holds = lambda value, truth: value >= truth - 1e-9 * np.maximum(1.0, np.abs(truth))
    cols = {"kl_proj": p.kl, "gen_proj": p.gen_ref, "B0_proj_upper": p.B0_upper,
            "B0_proj_upper_tightness": p.B0_upper - p.truth,
            "B0_proj_upper_valid": holds(p.B0_upper, p.truth).astype(np.float64)}
    pooled = pd.DataFrame.from_dict(
        {"B0_proj_upper": (p.pooled_B0_upper, p.pooled_truth, p.pooled_B0_upper - p.pooled_truth,
                           float(holds(p.pooled_B0_upper, p.pooled_truth)), "kd", "squared")},
        orient="index", columns=["value", "truth", "tightness", "valid", "family", "loss"])
    pooled.index.name = "bound"
    ratio = np.median(p.B0_upper / p.truth)
    notes = [f"B0_proj_upper: DV with the teacher projected on the student's rank-{st.rank} "
             "subspace (W_T Pi Pi^T) as the reference kernel, all finite-time closed forms "
             f"(kl_proj = KL(Q || P_proj), mean {p.kl.mean():.3g} nats; gen_proj its gap); "
             f"pooled {p.pooled_B0_upper:.4g} against gen_S_exact {p.pooled_truth:.4g} "
             f"(ratio {p.pooled_B0_upper / p.pooled_truth:.3g}; per-dataset median {ratio:.3g})"]
    return cols, pooled, notes
