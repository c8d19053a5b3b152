"""The gap's CGF under the teacher: exact closed form, empirical estimate, domain, flags."""

import jax
import numpy as np
import pytest

import kdsim
from kdsim import evaluation, run_populations
from kdsim.estimators import cgf
from kdsim.stats import bonferroni_z

from helpers import config, linear_laws_np, z_spread_ok


@pytest.fixture(scope="module")
def population():
    cfg = config(**{"num_datasets": 3, "num_particles": 4000, "seed": 2})
    run = run_populations(cfg)
    ctx, _, _ = evaluation.context(run)
    laws = ctx.finite_time
    kappa, A = cgf.exact_terms(laws.M_T, laws.Sigma_T, run.data.Cxx, run.data.Cyx,
                               run.data.W_star, run.data.sx)
    return run, ctx, kappa, A


def test_exact_cgf_matches_brute_force_sampling(population):
    """Independent check: 3 x 10^5 draws from the teacher law of tests/helpers.py, the gap
    of SPEC §1 and a log-mean-exp with its delta-method error, all written here."""
    run, ctx, kappa, A = population
    rng = np.random.default_rng(0)
    e, k = 0, run.config.task.k
    laws = linear_laws_np(run.config, run.data)
    L = np.linalg.cholesky(laws.Sigma_T[e])
    W = laws.M_T[e][None] + rng.normal(size=(300_000, k, L.shape[0])) @ L.T
    X, Y, W_star, sx, nu = run.data.X[e], run.data.Y[e], run.data.W_star, run.data.sx, run.data.noise
    B = W - W_star
    pop = 0.5 * (np.einsum("pkd,d,pkd->p", B, sx, B) + k * nu**2)
    train = 0.5 * np.mean(np.sum((np.einsum("pkd,nd->pnk", W, X) - Y) ** 2, -1), -1)
    g = pop - train
    exact = cgf.exact(kappa[e], A[e], k)
    with jax.enable_x64(True):
        assert exact.variance == pytest.approx(np.var(g), rel=0.02)
        lams = np.array([-0.5, 0.5, 1.0, 2.0]) / float(exact.scale)
        exact_fn = np.asarray(exact.fn(lams))
    x = lams[:, None] * (g - g.mean())                           # (4, draws)
    w = np.exp(x)
    brute = np.log(w.mean(1))
    # delta method for the log of a mean, centred at the sample mean: influence w/w̄ - 1 - x
    se = (w / w.mean(1, keepdims=True) - x).std(1, ddof=1) / np.sqrt(g.size)
    zs = (brute - exact_fn) / se
    assert np.max(np.abs(zs)) < bonferroni_z(len(lams)), zs


def test_empirical_cgf_agrees_with_exact_inside_its_ess_range(population):
    run, ctx, kappa, A = population
    zs = []
    for e in range(run.config.num_datasets):
        exact = cgf.exact(kappa[e], A[e], run.config.task.k)
        with jax.enable_x64(True):
            emp = cgf.empirical(ctx.g_T[e], np.ones(ctx.g_T.shape[1], bool),
                                run.config.estimators.ess_fraction)
            assert 0 < emp.lam_sup < np.inf and 0 < emp.eta_sup < np.inf
            for sign in (+1, -1):
                grid, mask = emp.grid(sign)
                grid = grid[mask][::8]
                zs.extend(np.asarray((emp.fn(sign * grid) - exact.fn(sign * grid)) / emp.se(sign * grid)))
    zs = np.asarray(zs)
    assert np.all(np.isfinite(zs))
    assert np.max(np.abs(zs)) < bonferroni_z(zs.size), zs
    ok, stat, limit = z_spread_ok(zs)          # the delta-method errors are not inflated
    assert ok, (stat, limit)


def test_ess_rule_sets_lam_max():
    """SPEC §5: lam_max is the largest lam of the 64-point grid geometric in
    [1e-3, 1e2] / sd(g) whose weights exp(lam g) keep an ESS (sum w)^2 / sum w^2 >= 10% of P."""
    g = np.random.default_rng(1).normal(size=2000)
    grid = np.geomspace(1e-3, 1e2, 64) / np.std(g, ddof=1)
    ess_by_hand = lambda x: (lambda w: w.sum(1) ** 2 / (w**2).sum(1))(np.exp(x - x.max(1, keepdims=True)))
    ess = ess_by_hand(grid[:, None] * (g - g.mean()))
    assert 0 < (ess >= 200).sum() < 64                       # the rule cuts inside the grid
    ess_lower = ess_by_hand(-grid[:, None] * (g - g.mean()))
    with jax.enable_x64(True):
        emp = cgf.empirical(g, np.ones(g.size, bool), 0.1)
        np.testing.assert_allclose(cgf.effective_sample_size(g, grid), ess, rtol=1e-10)
        assert float(emp.lam_sup) == pytest.approx(grid[ess >= 200].max(), rel=1e-12)
        assert float(emp.eta_sup) == pytest.approx(grid[ess_lower >= 200].max(), rel=1e-12)
        assert float(cgf.effective_sample_size(g, np.array([0.0]))[0]) == pytest.approx(2000)


def test_domain_and_kappa_detection():
    kappa = np.array([-0.5, 0.1, 0.25])
    c = cgf.exact(kappa, np.array([0.2, 0.1, 0.3]), k=2)
    with jax.enable_x64(True):
        _domain_checks(c, kappa)


def _domain_checks(c, kappa):
    assert c.kappa_max == 0.25 and c.kappa_min == -0.5
    assert float(c.lam_sup) == pytest.approx(4.0) and float(c.eta_sup) == pytest.approx(2.0)
    assert np.isfinite(c.fn(3.99)) and np.isinf(c.fn(4.0)) and np.isinf(c.fn(4.5))
    assert np.isfinite(c.fn(-1.99)) and np.isinf(c.fn(-2.0))
    # small-lam limit of 2 Lambda / lam^2 is the variance, computed without cancellation
    assert float(c.ratio(np.array([1e-12]))[0]) == pytest.approx(float(c.variance), rel=1e-10)
    # the lower grid stops at (1 - 1e-3)/|kappa_min| (SPEC §5)
    grid, mask = c.grid(-1)
    assert grid[mask].max() < (1 - 1e-3) * 2.0
    # a direct evaluation of the SPEC formula
    lam = 1.7
    direct = sum(2 * (-0.5 * np.log(1 - lam * kk) - 0.5 * lam * kk) + 0.5 * lam**2 * a / (1 - lam * kk)
                 for kk, a in zip(kappa, [0.2, 0.1, 0.3]))
    assert float(c.fn(lam)) == pytest.approx(direct, rel=1e-12)


def test_empirical_assumption_flag_can_fail():
    """n = d = 8: Hg = Sx - Cxx has kappa_max near 1, the upper tail is heavy, and a
    sigma fitted on the particles is contradicted by the exact Lambda."""
    res = kdsim.simulate({"task": {"n": 8}, "teacher": {"num_steps": 500},
                          "estimators": {"cgf": "empirical"}, "num_datasets": 8,
                          "num_particles": 512})
    flags = res.per_dataset["B1_upper_assumption"].to_numpy(dtype=bool)
    assert (~flags).any()
    assert any(n.startswith("B1_upper_assumption: False in datasets") for n in res.notes)
    # the same regime with the exact CGF: its B1 (lam_max = c_lam / kappa_max) holds
    exact = kdsim.simulate({"task": {"n": 8}, "teacher": {"num_steps": 500},
                            "num_datasets": 8, "num_particles": 512})
    assert exact.per_dataset["B1_upper_assumption"].to_numpy(dtype=bool).all()
    assert (exact.per_dataset["kappa_max"] > 0).all()
