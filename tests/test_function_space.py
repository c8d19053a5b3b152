"""Function-space bounds (SPEC §4): finite and valid for any student architecture,
checked against truths computed here (NumPy closed forms on the same ghost points)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import kdsim
from kdsim import bounds, evaluation, streams
from kdsim import function_space as fs
from kdsim.config import resolve
from kdsim.estimators import cgf
from kdsim.stats import bonferroni_z
from kdsim.tasks import linear_gaussian as lg

from helpers import data_for, linear_laws_np, linear_truths_np, z_spread_ok

_dv = jax.jit(lambda kl, c: bounds.dv_excess(kl, c, +1)[0])

F_BOUNDS = ["F_B0_upper", "F_B0_lower", "F_B1_upper", "F_B2_lower", "F_B3_upper"]


def _linear_function_space_truths(cfg):
    """gen_T_F, gen_S_F (noise-averaged: mean ghost loss - mean train loss; the channel
    noise adds the same constant to both) and the convexity bound summed over the
    training and ghost inputs, from the laws of tests/helpers.py: ``(E,)`` arrays."""
    data, res = data_for(cfg), resolve(cfg)
    laws = linear_laws_np(cfg, data)
    # the ghost points are data: drawn from their own streams, as the run draws them
    Xg, Yg = lg.sample_points(*fs.ghost_streams(streams.root_key(cfg.seed)),
                              np.arange(cfg.num_datasets), res.ghost_points, data.W_star,
                              data.sx, data.noise)
    k = data.Y.shape[-1]

    def risk(M, S, X, Y):                     # E over rows ~ N(M, S) of mean 0.5 ||y - W x||^2
        R = np.einsum("ekd,emd->emk", M, X) - Y
        return 0.5 * (np.mean(np.sum(R**2, -1), 1) + k * np.einsum("eij,emi,emj->e", S, X, X) / X.shape[1])

    out = {}
    for who, M, S in (("T", laws.M_T, laws.Sigma_T), ("S", laws.M_S, laws.Sigma_S)):
        out[f"gen_{who}_F"] = risk(M, S, Xg, Yg) - risk(M, S, data.X, data.Y)
    Xe = np.concatenate([data.X, Xg], axis=1)
    B = np.einsum("ekd,emd->emk", laws.M_S - laws.M_T, Xe)
    V = laws.Sigma_S + laws.Sigma_T - laws.C - np.swapaxes(laws.C, 1, 2)
    out["klF_convexity"] = (np.sum(B**2, (1, 2)) + k * np.einsum("eij,emi,emj->e", V, Xe, Xe)) \
        / (2 * res.numeric.channel_noise**2)
    return out


@pytest.fixture(scope="module")
def rank_result():
    res = kdsim.simulate({"task": {"d": 6, "k": 3, "n": 48}, "teacher": {"num_steps": 300},
                          "student": {"rank": 2, "alpha": 0.2, "teacher_noise": 0.3},
                          "num_datasets": 24, "num_particles": 256, "seed": 4})
    return res, _linear_function_space_truths(res.config)


def test_rank_student_convexity_and_gaps_match_closed_forms(rank_result):
    res, truth = rank_result
    df = res.per_dataset
    for c in ("klF_convexity", "gen_T_F", "gen_S_F"):
        np.testing.assert_allclose(df[c + "_exact"], truth[c], rtol=1e-9, err_msg=c)
    z = np.concatenate([(df[c] - truth[c]) / df[c + "_se"]
                        for c in ("klF_convexity", "gen_T_F", "gen_S_F")])
    assert np.max(np.abs(z)) < bonferroni_z(z.size), z
    ok, stat, limit = z_spread_ok(z)          # the standard errors are not inflated
    assert ok, (stat, limit)
    assert np.all(truth["klF_convexity"] > df["klpred_convexity_exact"])  # more points


def _hold_where_assumed(df, names, truth, truth_se):
    """Each bound against the truth with 3 standard errors (gen_T_F's and the truth's),
    where its assumption held (B0: everywhere); the number of checked cells."""
    checked = 0
    for b in names:
        held = np.ones(len(df), bool) if "B0" in b else \
            df[f"{b}_assumption"].to_numpy(dtype=bool, na_value=False)
        sign = 1.0 if b.endswith("upper") else -1.0
        slack = 3 * np.sqrt(df["gen_T_F_se"] ** 2 + truth_se**2)
        holds = sign * (df[b] - truth) >= -slack
        assert holds[held].all(), (b, df.loc[held & ~holds, ["dataset", b]])
        checked += held.sum()
    return checked


def test_rank_student_gets_finite_valid_function_space_bounds(rank_result):
    res, truth = rank_result
    df = res.per_dataset
    assert np.all(np.isinf(df["B1_upper"]))                  # parameter space: vacuous
    for b in ["F_B0_upper", "F_B0_lower", "F_B1_upper", "F_B2_lower"]:
        assert np.all(np.isfinite(df[b])), b
    assert np.all(np.isnan(df["F_B3_upper"]))                # Gaussian channel
    assert any(n.startswith("F_B3_upper: NaN: F_B3 needs a sub-Gaussian channel") for n in res.notes)
    assert _hold_where_assumed(df, F_BOUNDS, truth["gen_S_F"], 0.0) >= 24 * 2
    assert np.all(df["F_B0_upper"] <= df["F_B1_upper"] + 1e-9)
    assert np.all(df["F_B0_lower"] >= df["F_B2_lower"] - 1e-9)
    se = np.sqrt(np.sum(df["gen_T_F_se"] ** 2)) / len(df)
    assert res.pooled.loc["F_B0_upper", "value"] >= truth["gen_S_F"].mean() - 3 * se


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
    # the truth is Monte Carlo here: gen_S_F with its standard error
    assert _hold_where_assumed(df, F_BOUNDS, df["gen_S_F"], df["gen_S_F_se"]) >= 6 * 3
    assert np.all(df["F_sigma_B1"] == 1.0)
    assert df["F_B1_upper_assumption"].to_numpy(dtype=bool).all()


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
    truth = linear_truths_np(res.config)
    broken = 0
    for e in range(20):
        c = cgf.exact(kappa[e], A[e], res.config.task.k)
        with jax.enable_x64(True):
            plugged = truth["gen_T"][e] + float(_dv(df["klpred_exact"][e], c))
            honest = truth["gen_T"][e] + float(_dv(truth["kl"][e], c))
        assert truth["gen_S"][e] <= honest
        broken += truth["gen_S"][e] > plugged
        # kdsim's own check of a bound (no Monte Carlo error here) says so too
        with jax.enable_x64(True):
            assert bool(bounds.holds(plugged, truth["gen_S"][e], 0.0, upper=True)) == (truth["gen_S"][e] <= plugged)
    assert broken >= 5
    assert np.all(df["klpred_exact"] < truth["kl"])
    # and the parameter-space B0 that kdsim reports holds on the truth (3 se of gen_T)
    assert np.all(df["B0_upper"] >= truth["gen_S"] - 3 * df["gen_T_se"])


def test_gaussian_channel_draws_have_the_law_of_the_per_point_noise():
    """The Gaussian channel's g_F is drawn from four numbers per draw (the residuals'
    direction and a chi-square); its law must be that of adding nu_p z to every point.
    Against a brute-force NumPy sample of the per-point noise (two-sample KS), and the
    exact mean and variance (z-scores; the variance's se from the fourth moment)."""
    rng = np.random.default_rng(5)
    n, m, k, nu, draws = 12, 20, 2, 0.7, 20_000
    rt, rg = rng.normal(size=(n, k)), 1.5 * rng.normal(size=(m, k))
    got = np.asarray(fs._gaussian_channel_gaps(
        jax.random.key(3)[None], jnp.asarray(rt[None]), jnp.asarray(rg[None]), jnp.float32(nu),
        draws=draws))[0].astype(np.float64)
    z = rng.normal(size=(draws, n + m, k))
    brute = (0.5 * np.sum((rg - nu * z[:, n:]) ** 2, (1, 2)) / m
             - 0.5 * np.sum((rt - nu * z[:, :n]) ** 2, (1, 2)) / n)
    assert sps.ks_2samp(got, brute).pvalue > 1e-3
    mean = (0.5 * np.sum(rg**2) + 0.5 * nu**2 * m * k) / m - (0.5 * np.sum(rt**2) + 0.5 * nu**2 * n * k) / n
    var = ((nu**2 * np.sum(rg**2) + nu**4 * m * k / 2) / m**2
           + (nu**2 * np.sum(rt**2) + nu**4 * n * k / 2) / n**2)
    assert abs(got.mean() - mean) / np.sqrt(var / draws) < 4
    c = got - got.mean()
    var_se = np.sqrt((np.mean(c**4) - got.var() ** 2) / draws)
    assert abs(got.var() - var) / var_se < 4
