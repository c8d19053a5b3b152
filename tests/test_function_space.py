"""Function-space bounds (SPEC §4): finite and valid for any student architecture."""

import jax
import numpy as np
import pytest

import kdsim
from kdsim import bounds, evaluation
from kdsim.estimators import cgf
from kdsim.stats import bonferroni_z

_dv = jax.jit(lambda kl, c: bounds.dv_excess(kl, c, +1)[0])

F_BOUNDS = ["F_B0_upper", "F_B0_lower", "F_B1_upper", "F_B2_lower", "F_B3_upper"]


def _check_valid_where_assumed(df, names):
    checked = 0
    for b in names:
        held = df[f"{b}_assumption"].to_numpy(dtype=bool, na_value=False)
        valid = df[f"{b}_valid"].to_numpy(dtype=bool, na_value=False)
        assert valid[held].all(), (b, df.loc[held & ~valid, ["dataset", b]])
        checked += held.sum()
    return checked


@pytest.fixture(scope="module")
def rank_result():
    return kdsim.simulate({"task": {"d": 6, "k": 3, "n": 48}, "teacher": {"num_steps": 300},
                           "student": {"rank": 2, "alpha": 0.2, "teacher_noise": 0.3},
                           "num_datasets": 24, "num_particles": 256, "seed": 4})


def test_rank_student_convexity_and_gaps_match_closed_forms(rank_result):
    df = rank_result.per_dataset
    z = np.concatenate([(df[c] - df[c + "_exact"]) / df[c + "_se"]
                        for c in ("klF_convexity", "gen_T_F", "gen_S_F")])
    assert np.max(np.abs(z)) < bonferroni_z(z.size), z
    assert np.all(df["klF_convexity_exact"] > df["klpred_convexity_exact"])  # more points


def test_rank_student_gets_finite_valid_function_space_bounds(rank_result):
    df = rank_result.per_dataset
    assert np.all(np.isinf(df["B1_upper"]))                  # parameter space: vacuous
    for b in ["F_B0_upper", "F_B0_lower", "F_B1_upper", "F_B2_lower"]:
        assert np.all(np.isfinite(df[b])), b
    assert np.all(np.isnan(df["F_B3_upper"]))                # Gaussian channel
    assert any(n.startswith("F_B3_upper: NaN: F_B3 needs a sub-Gaussian channel") for n in rank_result.notes)
    assert _check_valid_where_assumed(df, F_BOUNDS) >= 24 * 2
    assert np.all(df["F_B0_upper"] <= df["F_B1_upper"] + 1e-9)
    assert np.all(df["F_B0_lower"] >= df["F_B2_lower"] - 1e-9)
    assert np.all(df["F_B0_upper_valid"].to_numpy(dtype=bool))
    assert rank_result.pooled.loc["F_B0_upper", "valid"] == 1.0


def test_classification_compression_function_space_bounds():
    """Width-8 student of a width-64 teacher: finite, valid, B1 (bounded sigma) above the truth."""
    res = kdsim.simulate({"task": {"name": "mlp_classification", "d": 4, "n": 32, "n_test": 256},
                          "teacher": {"num_steps": 150, "model": {"width": 64}},
                          "student": {"model": {"width": 8}, "alpha": 0.2, "temperature": 2.0},
                          "num_datasets": 6, "num_particles": 32})
    df = res.per_dataset
    for b in ["F_B0_upper", "F_B0_lower", "F_B1_upper", "F_B2_lower", "F_B3_upper", "klF_convexity"]:
        assert np.all(np.isfinite(df[b])), b
    assert np.all(np.isnan(df["B1_upper"]))                  # no parameter-space KL here
    _check_valid_where_assumed(df, F_BOUNDS)
    assert np.all(df["F_sigma_B1"] == 1.0)
    assert df["F_B1_upper_assumption"].to_numpy(dtype=bool).all()
    assert np.all(df["F_B1_upper"] >= df["gen_S_F"] - 3 * df["gen_S_F_se"])
    assert np.all(df["F_B1_upper_valid"].to_numpy(dtype=bool))


def test_plugging_the_predictive_kl_into_parameter_space_bounds_violates_them():
    """KLpred <= KL_D and vanishes as nu_p grows: used in the parameter-space bound it
    breaks it (SPEC §4: 112 of 180 cases). kdsim never does this; this test keeps it so."""
    res = kdsim.simulate({"task": {"d": 6, "n": 48}, "teacher": {"num_steps": 400},
                          "student": {"alpha": 0.0, "teacher_noise": 0.5},
                          "estimators": {"channel_noise": 5.0},
                          "num_datasets": 20, "num_particles": 64, "seed": 2})
    df = res.per_dataset
    run = kdsim.run_populations(res.config)
    ctx, _, _ = evaluation.context(run)
    kappa, A = cgf.exact_terms(ctx.finite_time.M_T, ctx.finite_time.Sigma_T, run.data.Cxx,
                               run.data.Cyx, run.data.W_star, run.data.sx)
    broken = 0
    for e in range(20):
        c = cgf.exact(kappa[e], A[e], res.config.task.k)
        with jax.enable_x64(True):
            plugged = df["gen_T_exact"][e] + float(_dv(df["klpred_exact"][e], c))
            honest = df["gen_T_exact"][e] + float(_dv(df["kl_exact"][e], c))
        assert df["gen_S_exact"][e] <= honest
        broken += df["gen_S_exact"][e] > plugged
    assert broken >= 5
    assert np.all(df["klpred_exact"] < df["kl_exact"])
    # and the parameter-space bounds kdsim reports all hold
    assert df["B0_upper_valid"].to_numpy(dtype=bool).all()
