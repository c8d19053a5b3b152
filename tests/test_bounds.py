"""Bounds B0-B3: formulas, orderings (SPEC §8), validity against truths computed here
(independent NumPy closed forms), and cases where a bound or an assumption must fail."""

import math

import jax
import numpy as np
import pytest

import kdsim
from kdsim import bounds
from kdsim.estimators import cgf

from helpers import linear_truths_np

BOUNDS = ["B0_upper", "B0_lower", "B1_upper", "B2_lower", "B3_upper"]


def _random_cgfs(rng, n):
    d = 5
    kappa = rng.normal(size=(n, d)) * 0.3
    return cgf.exact(kappa, rng.uniform(0.01, 0.3, (n, d)), k=2)


dv = jax.jit(jax.vmap(bounds.dv_excess, in_axes=(0, 0, None)), static_argnums=2)


def test_dv_minimum_matches_brute_force_and_guards_zero_kl():
    rng = np.random.default_rng(0)
    cs = _random_cgfs(rng, 10)
    kl = rng.uniform(0.01, 3, 10)
    brute_lam = np.geomspace(1e-7, 1.0, 50_000)
    with jax.enable_x64(True):
        for sign in (+1, -1):
            val, lam = dv(kl, cs, sign)
            for e in range(10):
                c = jax.tree_util.tree_map(lambda a: a[e], cs)
                sup = float(c.lam_sup if sign > 0 else c.eta_sup)
                hi = sup * (1 - 1e-12) if np.isfinite(sup) else 1e4
                brute = brute_lam * hi
                best = np.min((kl[e] + np.asarray(c.fn(sign * brute))) / brute)
                # the refined optimum may undercut the grid, never by more than its resolution
                assert abs(val[e] - best) <= 1e-5 * abs(best) + 1e-12
        edge = np.array([0.0, 1e-14, math.inf] + [1.0] * 7)
        val, _ = dv(edge, cs, +1)
        assert val[0] == 0.0
        assert val[1] < 1e-5            # continuous at KL -> 0
        assert val[2] == math.inf


def test_subgaussian_regimes():
    with jax.enable_x64(True):
        assert bounds.subgaussian_excess(2.0, 0.25, math.inf)[0] == pytest.approx(math.sqrt(2 * 0.25 * 2.0))
        # sqrt(2 KL)/sigma = 4 > lam_max = 1: linear regime KL/lam_max + lam_max sigma^2/2
        val, lam = bounds.subgaussian_excess(2.0, 0.25, 1.0)
        assert lam == 1.0 and val == pytest.approx(2.0 + 0.125)
        assert bounds.subgaussian_excess(0.0, 0.25, 1.0)[0] == 0.0


def test_tightness_radius_is_exactly_where_b3_beats_b1():
    rng = np.random.default_rng(1)
    G, S, sig_ref = rng.uniform(0, 2, 500), rng.uniform(0.01, 3, 500), rng.uniform(0.01, 2, 500)
    with jax.enable_x64(True):
        rho0 = np.asarray(bounds.tightness_radius(G, S, sig_ref))
        np.testing.assert_allclose(bounds.sharpness_sigma(G, S, rho0), sig_ref, rtol=1e-9)
        rho = rho0 * rng.uniform(0.2, 1.8, 500)
        kl = rng.uniform(0.01, 2, 500)
        b3 = np.asarray(bounds.subgaussian_excess(kl, bounds.sharpness_sigma(G, S, rho) ** 2, math.inf)[0])
        b1 = np.asarray(bounds.subgaussian_excess(kl, sig_ref**2, math.inf)[0])
        assert np.array_equal(b3 < b1, rho < rho0)
        # a flatter teacher (smaller S) widens the radius
        assert bounds.tightness_radius(0.5, 0.1, 1.0) > bounds.tightness_radius(0.5, 1.0, 1.0)


@jax.jit
@jax.vmap
def _b0_b1_b2(kl, c):
    lam_max = bounds.b1_lam_max(c, 0.5)
    s2 = bounds.subgaussian_sigma2(c, lam_max)
    b1, lam1 = bounds.subgaussian_excess(kl, s2, lam_max)
    b2 = bounds.central_excess(kl, c)
    b0u = bounds.dv_excess(kl, c, +1, lam1)[0]
    etas, mask = c.grid(-1)
    b0l = bounds.dv_excess(kl, c, -1, etas, mask)[0]
    return b0u, b1, b0l, b2.excess, bounds.subgaussian_holds(c, s2, lam_max)


def test_b0_is_never_looser_than_b1_b2_on_random_cgfs():
    rng = np.random.default_rng(2)
    cs = _random_cgfs(rng, 50)
    kl = rng.uniform(0.001, 5, 50)
    with jax.enable_x64(True):
        b0u, b1, b0l, b2, held = (np.asarray(a) for a in _b0_b1_b2(kl, cs))
    assert np.all(b0u <= b1 * (1 + 1e-12)) and np.all(b0l <= b2 * (1 + 1e-12))
    assert held.all()


UNTUNED = {
    "small_n": {"task": {"n": 16, "d": 6}},
    "distill_mix": {"task": {"d": 6}, "student": {"alpha": 0.5, "teacher_noise": 0.7}},
    "decaying": {"task": {"d": 6, "k": 3, "input_decay": 1.0, "signal_decay": 0.5, "n": 40}},
    "tempered": {"task": {"d": 6}, "teacher": {"gamma": 30.0, "prior_scale": 0.7},
                 "student": {"langevin": {"gamma": 60.0}, "alpha": 0.2}},
    "empirical_cgf": {"task": {"d": 6}, "student": {"alpha": 0.3},
                      "estimators": {"cgf": "empirical"}},
    "gaussian_kl": {"task": {"d": 3}, "student": {"alpha": 0.7},
                    "estimators": {"bound_divergence": "gaussian_full"}},
}


def _verdicts(df, truth):
    """Does each bound hold on the independent truth, allowing 3 Monte Carlo standard
    errors of gen_T (the bound's only noise when its KL is exact)? ``{bound: (E,) bool}``,
    and the distance from the edge in those standard errors (to skip knife-edge cells)."""
    out = {}
    for b in BOUNDS:
        sign = 1.0 if b.endswith("upper") else -1.0
        margin = sign * (df[b].to_numpy() - truth) / df["gen_T_se"].to_numpy()
        out[b] = (margin >= -3.0, np.abs(margin + 3.0))
    return out


@pytest.mark.parametrize("name", list(UNTUNED))
def test_bounds_with_valid_assumptions_hold_on_24_datasets(name):
    over = dict(UNTUNED[name])
    teacher = {**over.get("teacher", {}), "num_steps": 250}
    cfg = {**over, "teacher": teacher, "num_datasets": 24, "num_particles": 256, "seed": 7}
    res = kdsim.simulate(cfg)
    df = res.per_dataset
    truth = linear_truths_np(res.config)
    np.testing.assert_allclose(df["gen_S_exact"], truth["gen_S"], rtol=1e-9)
    if res.config.estimators.bound_divergence in (None, "exact"):
        np.testing.assert_allclose(df["kl_exact"], truth["kl"], rtol=1e-9)   # the KL plugged in
    checked = 0
    for b, (holds, _) in _verdicts(df, truth["gen_S"]).items():
        assert np.all(np.isfinite(df[b]))
        # B0 assumes nothing: it must hold everywhere; the others where their assumption did
        held = np.ones(len(df), bool) if b.startswith("B0") else \
            df[f"{b}_assumption"].to_numpy(dtype=bool, na_value=False)
        assert holds[held].all(), (b, df.loc[held & ~holds, ["dataset", b, "gen_S_exact"]])
        checked += held.sum()
    assert checked >= 24 * 3
    tol = 1e-9 * np.abs(df["gen_T"]).max()
    assert np.all(df["B0_upper"] <= df["B1_upper"] + tol)
    assert np.all(df["B0_lower"] >= df["B2_lower"] - tol)
    # pooled bounds on the dataset average, against the average of the independent truths
    pooled = res.pooled
    se = np.sqrt(np.sum(df["gen_T_se"] ** 2)) / len(df)
    for b in ("B0_upper", "B1_upper"):
        assert pooled.loc[b, "value"] >= truth["gen_S"].mean() - 3 * se
    for b in ("B0_lower", "B2_lower"):
        assert pooled.loc[b, "value"] <= truth["gen_S"].mean() + 3 * se
    assert pooled.loc["B0_upper", "value"] <= pooled.loc["B1_upper", "value"] + 1e-12
    # one lam for all datasets: the pooled bound is the average of per-dataset ones or looser
    assert pooled.loc["B0_upper", "value"] >= df["B0_upper"].mean() - 1e-12


def test_a_wrong_kl_breaks_the_bounds_and_the_flags_say_so():
    """The stationary KL of a student that ran 2 steps (it is still near its initial law)
    is ~1 where the true KL is ~200: plugged into the bounds it breaks them on about half
    the datasets. Every validity flag must agree with the verdict computed here."""
    res = kdsim.simulate({"task": {"d": 4, "n": 16}, "teacher": {"num_steps": 400},
                          "student": {"alpha": 0.0, "langevin": {"num_steps": 2}},
                          "estimators": {"bound_divergence": "stationary"},
                          "num_datasets": 8, "num_particles": 128, "seed": 3})
    df = res.per_dataset
    truth = linear_truths_np(res.config)
    assert np.all(truth["kl"] > 50 * df["kl_stationary"])
    failed = held = 0
    for b, (holds, edge) in _verdicts(df, truth["gen_S"]).items():
        flag = df[f"{b}_valid"].to_numpy(dtype=bool, na_value=False)
        clear = edge > 1e-6
        np.testing.assert_array_equal(flag[clear], holds[clear], err_msg=b)
        failed += (~holds[clear]).sum()
        held += holds[clear].sum()
    assert failed >= 8 and held >= 8
    assert any(n.startswith("B0_upper_valid: False in datasets") for n in res.notes)


def _direct_lambda(kappa, a2, k, lam):
    """SPEC §3's Lambda_D written out, ``a2`` the squared a_ji summed over the k rows."""
    lam = np.asarray(lam, np.float64)[..., None]
    return np.sum(k * (-0.5 * np.log1p(-lam * kappa) - 0.5 * lam * kappa)
                  + 0.5 * lam**2 * a2 / (1 - lam * kappa), axis=-1)


def test_assumption_checks_follow_a_direct_cgf_and_fail_when_broken():
    """subgaussian_holds / central_holds against sup 2 Lambda/lam^2 and Lambda(-eta)/eta
    computed here on a fine grid: a sigma^2 or eps 2% short of the truth must be refused."""
    rng = np.random.default_rng(5)
    for _ in range(6):
        # both signs: a sub-exponential upper tail and a capped lower one
        kappa = np.concatenate([-rng.uniform(0.05, 0.5, 2), rng.uniform(0.05, 0.5, 3)])
        a2 = rng.uniform(0.01, 0.3, 5)
        c = cgf.exact(kappa, a2, k=2)
        lam_max = 0.5 / kappa.max()
        grid = np.geomspace(1e-7, lam_max, 20_000)
        sup = np.max(2 * _direct_lambda(kappa, a2, 2, grid) / grid**2)
        assert bounds.subgaussian_holds(c, 1.02 * sup, lam_max)
        assert not bounds.subgaussian_holds(c, 0.98 * sup, lam_max)
        # lam_max beyond the domain: Lambda is infinite inside the claimed range
        assert not bounds.subgaussian_holds(c, 1e6 * sup, 1.01 / kappa.max())
        eta = 0.5 / abs(kappa.min())
        eps = _direct_lambda(kappa, a2, 2, -eta) / eta
        assert bounds.central_holds(c, eta, 1.02 * eps)
        assert not bounds.central_holds(c, eta, 0.98 * eps)
    # bounds.holds: the truth beyond the bound by more than z standard errors fails
    assert bounds.holds(1.0, 1.29, 0.1, upper=True) and not bounds.holds(1.0, 1.31, 0.1, upper=True)
    assert bounds.holds(1.0, 0.71, 0.1, upper=False) and not bounds.holds(1.0, 0.69, 0.1, upper=False)
    assert not bounds.holds(math.nan, 0.0, 0.1, upper=True)


def test_b0_never_looser_than_b3_under_the_spec_condition():
    res = kdsim.simulate({"task": {"d": 4, "n": 200}, "teacher": {"num_steps": 400},
                          "num_datasets": 8, "num_particles": 256})
    df = res.per_dataset
    k = res.config.task.k
    from kdsim import evaluation
    run = kdsim.run_populations(res.config)
    ctx, _, _ = evaluation.context(run)
    kappa, A = cgf.exact_terms(ctx.finite_time.M_T, ctx.finite_time.Sigma_T, run.data.Cxx,
                               run.data.Cyx, run.data.W_star, run.data.sx)
    n_checked = 0
    for e in range(8):
        c = cgf.exact(kappa[e], A[e], k)
        sig = df["gap_gradient"][e] * df["rho"][e] + 0.5 * df["gap_curvature"][e] * df["rho"][e] ** 2
        lam_star = math.sqrt(2 * df["kl_exact"][e]) / sig
        with jax.enable_x64(True):
            inside = lam_star < c.lam_sup and c.fn(lam_star) <= 0.5 * lam_star**2 * sig**2
        if inside:
            n_checked += 1
            assert df["B0_upper"][e] <= df["B3_upper"][e] + 1e-12
    assert n_checked > 0


def test_rank_student_parameter_bounds_are_vacuous_with_reason():
    res = kdsim.simulate({"task": {"d": 4}, "student": {"rank": 2}, "teacher": {"num_steps": 100},
                          "num_datasets": 3, "num_particles": 64})
    df = res.per_dataset
    for b in ("B0_upper", "B1_upper", "B3_upper"):
        assert np.all(df[b] == np.inf)
    for b in ("B0_lower", "B2_lower"):
        assert np.all(df[b] == -np.inf)
    assert any("rank-2 student's parameter-space KL is infinite" in n for n in res.notes)
