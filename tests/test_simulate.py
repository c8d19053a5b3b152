"""simulate() (kdsim/simulate.py): columns, summary and notes, infinite KLs with their
reason, no recompilation for numeric fields, bit-identical reruns, float32 against
float64, Monte Carlo against the exact laws."""

import numpy as np
import pandas as pd
import pytest

import kdsim
from kdsim import populations
from kdsim.stats import bonferroni_z
from kdsim.tasks import linear_gaussian as lg

from helpers import SMALL_LINEAR, assert_never_flagged, linear_truths_np, z_spread_ok


SMALL = SMALL_LINEAR

ISSUE_COLUMNS = ["dataset", "gen_T", "gen_S", "gen_T_se", "gen_S_se", "gen_T_exact", "gen_S_exact",
                 "kl_exact", "kl_stationary", "klpred_exact", "klpred_convexity",
                 "klpred_convexity_exact", "decomp_bias", "decomp_subspace", "decomp_rank",
                 "decomp_variance", "diverged_T", "diverged_S"]


def test_columns_and_summary(small_result):
    res = small_result
    for col in ISSUE_COLUMNS:
        assert col in res.per_dataset.columns, col
    assert list(res.per_dataset["dataset"]) == [0, 1, 2]
    assert res.datasets["X"].shape == (3, 16, 3) and res.datasets["Y"].shape == (3, 16, 2)
    assert res.datasets["W_star"].shape == (2, 3)
    assert set(res.summary.columns) >= {"mean", "se", "ci_low", "ci_high"}
    row = res.summary.loc["gen_T"]
    v = res.per_dataset["gen_T"]
    assert row["mean"] == pytest.approx(v.mean())
    assert row["se"] == pytest.approx(v.std(ddof=1) / np.sqrt(3))
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    assert np.all(np.isfinite(res.per_dataset[ISSUE_COLUMNS].to_numpy(float)))
    # the only non-finite columns are the function-space B3 ones (Gaussian channel), with a reason
    assert any(n.startswith("F_B3_upper: NaN: F_B3 needs a sub-Gaussian channel") for n in res.notes)
    # (and the generic bounds' pooled rows, which need estimators.loss_clip for regression)
    odd = [n for n in res.notes if ("NaN" in n or "DIVERGED" in n or "infinite" in n)
           and "F_B3" not in n and "loss_clip" not in n]
    assert not odd, odd
    assert "<table" in res._repr_html_()


def test_rank_student_reports_infinite_kl_with_reason():
    res = kdsim.simulate({**SMALL, "student": {"rank": 2}})
    assert np.all(np.isinf(res.per_dataset["kl_exact"]))
    assert np.all(np.isinf(res.per_dataset["kl_stationary"]))
    assert np.all(np.isfinite(res.per_dataset["klpred_exact"]))
    assert any(n.startswith("kl_exact, kl_stationary: +inf") for n in res.notes)
    assert any(n.startswith("infinite: ") and "kl_exact (3 of 3)" in n for n in res.notes)
    assert res.summary.loc["kl_exact", "mean"] == np.inf


def test_numeric_fields_do_not_recompile(small_result):
    fns = [populations._linear_init, populations._linear_targets, populations._linear_segment,
           lg._standard_draws]
    before = [f._cache_size() for f in fns]
    changed = kdsim.simulate({**SMALL, "teacher": {"num_steps": 40, "gamma": 20.0, "step_size": 1e-3,
                                                  "prior_scale": 2.0, "init_scale": 0.5},
                              "task": {**SMALL["task"], "noise": 0.3, "input_scale": 2.0},
                              "student": {"alpha": 0.4, "teacher_noise": 0.7,
                                          "langevin": {"step_size": 5e-4, "gamma": 15.0}}})
    assert [f._cache_size() for f in fns] == before
    assert not np.allclose(changed.per_dataset["gen_S"], small_result.per_dataset["gen_S"])


def test_same_config_is_bit_identical(small_result):
    again = kdsim.simulate(SMALL)
    pd.testing.assert_frame_equal(again.per_dataset, small_result.per_dataset, check_exact=True)


def test_float64_engine_same_datasets_close_values(small_result):
    """The float64 engine draws its noise in float64, so its particles are other draws
    from the same laws: its Monte Carlo estimates agree with float32's within their joint
    standard error, and both with the closed forms computed here."""
    r32 = kdsim.run_populations(SMALL)
    r64 = kdsim.run_populations({**SMALL, "dtype": "float64"})
    np.testing.assert_array_equal(r32.data.X, r64.data.X)
    assert_never_flagged(r32)       # the escape test never fires on healthy chains
    assert_never_flagged(r64)
    assert r64.populations.teacher.dtype == np.float64
    assert r32.populations.teacher.dtype == np.float32
    d32, d64 = small_result.per_dataset, kdsim.simulate({**SMALL, "dtype": "float64"}).per_dataset
    truth = linear_truths_np(small_result.config)
    cols = ("gen_T", "gen_S", "test_loss_T", "test_loss_S")
    z = [(d32[c] - d64[c]) / np.sqrt(d32[c + "_se"] ** 2 + d64[c + "_se"] ** 2) for c in cols]
    z += [(d[c] - truth[c]) / d[c + "_se"] for d in (d32, d64) for c in cols]
    z = np.concatenate(z)
    assert np.max(np.abs(z)) < bonferroni_z(z.size), z
    assert not np.array_equal(d32["gen_S"], d64["gen_S"])      # the float64 path really ran


def test_monte_carlo_matches_exact_at_default_shape():
    """Default-like shape (d=8, k=2, n=64): gaps, test losses and the scratch student
    within Bonferroni of closed forms computed here, with standard errors not inflated."""
    res = kdsim.simulate({"teacher": {"num_steps": 300}, "num_datasets": 8, "num_particles": 512,
                          "student": {"alpha": 0.3, "teacher_noise": 0.5}})
    df = res.per_dataset
    assert (df["diverged_T"] == 0).all() and (df["diverged_S"] == 0).all()
    assert (df["diverged_scratch"] == 0).all()
    truth = linear_truths_np(res.config)
    cols = ("gen_T", "gen_S", "test_loss_T", "test_loss_S", "gen_S_scratch", "test_loss_S_scratch")
    for c in cols:                                   # kdsim's closed forms, and its estimates
        np.testing.assert_allclose(df[c + "_exact"], truth[c], rtol=1e-9, err_msg=c)
    z = np.concatenate([((df[c] - truth[c]) / df[c + "_se"]).to_numpy() for c in cols]
                       + [((df["klpred_convexity"] - df["klpred_convexity_exact"])
                           / df["klpred_convexity_se"]).to_numpy()])
    assert np.max(np.abs(z)) < bonferroni_z(z.size), z
    ok, stat, limit = z_spread_ok(z)
    assert ok, (stat, limit)
