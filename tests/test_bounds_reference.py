"""Oracle suite for kdsim/bounds.py and the array CGFs: the vectorised bounds (one jitted
program over all datasets) against the scalar reference (tests/scalar_bounds_reference.py:
the per-dataset NumPy/SciPy code they replaced), on many random CGFs, exact and
empirical, and on the edge cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdsim import bound_tables
from kdsim import bounds
from kdsim.estimators import cgf

import scalar_bounds_reference as ref

REL = 1e-9
PER_FIELDS = ("sigma_B1", "lam_max", "B2_eta", "B2_eps", "rho0")


def close(a, b, scale, rel=REL):
    """Equal to ``rel`` relative (absolute floor 1e-12 x the CGF's scale, for values that
    cancel to ~0); infinities and NaN must coincide."""
    a, b = float(a), float(b)
    if math.isnan(b) or math.isinf(b):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= rel * abs(b) + 1e-12 * scale


def _kappas(rng, E, d):
    """Eigenvalues of every sign pattern: mixed, all <= 0 (lam_max = inf), all >= 0
    (eta_sup = inf), and tiny ones."""
    out = []
    for e in range(E):
        kind = e % 4
        kap = rng.normal(size=d) * rng.uniform(0.05, 0.6)
        if kind == 1:
            kap = -np.abs(kap)
        elif kind == 2:
            kap = np.abs(kap)
        elif kind == 3:
            kap = kap * 1e-4
        out.append(kap)
    return np.stack(out)


def _kl_column(rng, E):
    kl = rng.uniform(0.001, 5.0, E) * rng.choice([1e-3, 1.0, 10.0], E)
    kl[0], kl[1], kl[2], kl[3] = 0.0, np.inf, -0.01, 1e-14      # KL = 0, inf, noise < 0, tiny
    kl_se = rng.uniform(0, 0.3, E) * kl
    kl_se[4], kl_se[5] = np.nan, 0.0
    return kl, kl_se


def _inputs(rng, E, kl, kl_se, used, has_check, scale):
    f = lambda lo, hi: rng.uniform(lo, hi, E) * scale
    sharp = dict(G=f(0, 1), S=f(0, 2), rho=rng.uniform(0, 1, E), outside=rng.choice([0.0, 0.1], E),
                 extra_var=rng.choice([0.0, 0.05], E) * scale**2)
    gen_T, gen_T_se = f(-0.5, 0.5), f(0, 0.05)
    truth, truth_se = gen_T + f(-0.3, 0.6), f(0, 0.05)
    x = bounds.DatasetInputs(kl=kl, kl_se=kl_se, gen_T=gen_T, gen_T_se=gen_T_se, truth=truth,
                             truth_se=truth_se, used=used, has_check=has_check, **sharp)
    return x, sharp


def _compare(per, pooled, x, sharp, fits, checks, c_lam, sigma_bounded, has_b3, scales, used):
    E = len(scales)
    n_checked = 0
    for e in range(E):
        if not used[e]:
            assert np.all(np.isnan(per.value[:, e])) and np.isnan(per.sigma_B1[e])
            continue
        sh = None if not has_b3 else {k: float(v[e]) for k, v in sharp.items()}
        want = ref.dataset(float(x.kl[e]), float(x.kl_se[e]), float(x.gen_T[e]), float(x.gen_T_se[e]),
                           float(x.truth[e]), float(x.truth_se[e]), fits[e], checks[e], c_lam,
                           sigma_bounded, sh)
        for b, name in enumerate(bounds.BOUND_NAMES):
            assert close(per.value[b, e], want[name], scales[e]), (e, name, per.value[b, e], want[name])
            for flag, got in (("valid", per.valid), ("assumption", per.assumption)):
                w = want[f"{name}_{flag}"]
                assert (np.isnan(got[b, e]) and np.isnan(w)) or got[b, e] == w, (e, name, flag)
        for name in PER_FIELDS:
            assert close(getattr(per, name)[e], want[name], scales[e]), (e, name)
        # the minimisers only to the precision a flat minimum allows
        for name in ("B0_lam", "B0_eta"):
            assert close(getattr(per, name)[e], want[name], scales[e], rel=1e-5), (e, name)
        n_checked += 1
    idx = np.flatnonzero(used)
    want = ref.pooled_bounds(x.kl[idx], x.gen_T[idx], x.gen_T_se[idx], x.truth[idx], x.truth_se[idx],
                             [fits[e] for e in idx], c_lam, sigma_bounded)
    for i, name in enumerate(bounds.POOLED_NAMES):
        value, truth, tight, valid = want[name]
        assert close(pooled.value[i], value, 1.0) and close(pooled.tightness[i], tight, 1.0), name
        assert close(pooled.truth, truth, 1.0) and pooled.valid[i] == valid, name
    return n_checked


def _run(x, fit, check, c_lam, sigma_bounded, has_b3):
    with jax.enable_x64(True):
        xj = jax.tree_util.tree_map(jnp.asarray, x)
        per = bounds.dataset_bounds(xj, fit, check, c_lam, sigma_bounded=sigma_bounded, has_b3=has_b3)
        pooled = bounds.pooled_bounds(xj, fit, c_lam, sigma_bounded=sigma_bounded)
        return jax.device_get((per, pooled))


def test_exact_cgfs_match_the_scalar_bounds():
    rng = np.random.default_rng(0)
    E, d = 32, 5
    kappa = _kappas(rng, E, d)
    A = rng.uniform(0.0, 0.3, (E, d)) * rng.choice([1e-3, 1.0, 30.0], (E, 1))
    k = 2
    kl, kl_se = _kl_column(rng, E)
    used = np.ones(E, bool)
    used[6] = False                                  # e.g. too few surviving pairs
    fits = [ref.exact(kappa[e], A[e], k) for e in range(E)]
    scales = np.array([c.scale for c in fits])
    x, sharp = _inputs(rng, E, kl, kl_se, used, np.ones(E, bool), scales)
    batch = cgf.exact(kappa, A, k)
    with jax.enable_x64(True):
        fit = jax.tree_util.tree_map(jnp.asarray, batch)
    per, pooled = _run(x, fit, fit, 0.5, None, True)
    assert _compare(per, pooled, x, sharp, fits, fits, 0.5, None, True, scales, used) == E - 1
    # every sign pattern of kappa occurred, and lam_max = inf where kappa_max <= 0
    assert np.isinf(per.lam_max[1]) and np.isfinite(per.lam_max[2])
    assert np.isinf(per.value[0, 1]) and np.isinf(per.value[1, 1])          # KL = inf
    assert per.value[0, 0] == x.gen_T[0] == per.value[1, 0]                 # KL = 0: B0 = gen_T


@pytest.mark.parametrize("sigma_bounded", [None, 1.0])
def test_empirical_cgfs_through_bound_columns_match_the_scalar_bounds(sigma_bounded):
    """Through :func:`bound_tables.bound_arrays`: the first n_fit particles fit, the
    held-out rest check, diverged pairs are masked out, datasets padded to a bucket."""
    rng = np.random.default_rng(1 if sigma_bounded is None else 2)
    E, P, n_fit = 24, 96, 72
    shapes = [lambda n: rng.normal(size=n), lambda n: rng.exponential(size=n) - 1.0,
              lambda n: -rng.exponential(size=n), lambda n: rng.standard_t(3, size=n)]
    g = np.stack([shapes[e % 4](P) * rng.uniform(0.01, 3.0) for e in range(E)])
    ok = rng.uniform(size=(E, P)) > 0.1
    ok[7, n_fit:] = False                              # no held-out particles: no check
    ok[8, n_fit + 2:] = False                          # too few held-out particles
    ok[9] = False                                      # not usable
    usable = ok.sum(1) >= bound_tables.MIN_PAIRS
    kl, kl_se = _kl_column(rng, E)
    kl[10] = np.nan                                    # no KL: no bounds
    has_b3 = sigma_bounded is None
    scales = np.array([np.std(g[e, :n_fit][ok[e, :n_fit]], ddof=1) if usable[e] else 1.0
                       for e in range(E)])
    for ess_fraction in (0.1, 1 - 1e-9):               # the second: empty lam and eta grids
        x, sharp = _inputs(rng, E, kl, kl_se, usable & ~np.isnan(kl), None, scales)
        inp = bound_tables.BoundInputs(
            gen_T=x.gen_T, gen_T_se=x.gen_T_se, truth=x.truth, truth_se=x.truth_se, kl=kl,
            kl_se=kl_se, kl_reason="", g_T=g, ok=ok, usable=usable, n_fit=n_fit,
            cgf_kind="empirical", exact_cgfs=None, sharp=sharp if has_b3 else None,
            sharp_reason="", sigma_bounded=sigma_bounded, c_lam=0.5, ess_fraction=ess_fraction)
        per, pooled = bound_tables.bound_arrays(inp)
        fits = [ref.empirical(g[e, :n_fit][ok[e, :n_fit]], ess_fraction) if usable[e] else None
                for e in range(E)]
        checks = [ref.empirical(g[e, n_fit:][ok[e, n_fit:]], ess_fraction)
                  if ok[e, n_fit:].sum() >= bound_tables.MIN_PAIRS else None for e in range(E)]
        used = usable & ~np.isnan(kl)
        x = x._replace(used=used)
        n = _compare(per, pooled, x, sharp, fits, checks, 0.5, sigma_bounded, has_b3, scales, used)
        assert n == E - 2
        # no independent check: no B2 flag (nor a fitted B1's; a bounded loss needs none)
        assert np.isnan(per.assumption[3, 7]) and np.isnan(per.assumption[3, 8])
        assert np.isnan(per.assumption[2, 7]) == (sigma_bounded is None)
        if ess_fraction > 0.5:
            assert all(f.grid(-1).size == 0 for f in fits if f is not None)
            assert np.isinf(per.value[1, 11]) and np.isnan(per.B2_eta[11])          # empty grids
        else:
            assert np.isfinite(per.value[:4, 11]).all()


def test_empirical_cgf_arrays_match_the_scalar_cgf():
    rng = np.random.default_rng(3)
    g = rng.standard_t(4, size=(6, 200)) * rng.uniform(0.1, 2, (6, 1))
    w = rng.uniform(size=g.shape) > 0.2
    lams = np.array([-3.0, -0.7, -1e-3, 0.0, 1e-3, 0.7, 3.0])
    with jax.enable_x64(True):
        batch = cgf.empirical_batch(g, w, 0.1)
        for e in range(6):
            want = ref.empirical(g[e][w[e]], 0.1)
            one = jax.tree_util.tree_map(lambda a: a[e], batch)
            # the same grid point passes the ESS rule (equal to rounding of sd_P(g))
            assert float(one.lam_sup) == pytest.approx(want.lam_sup, rel=1e-14)
            assert float(one.eta_sup) == pytest.approx(want.eta_sup, rel=1e-14)
            assert float(one.variance) == pytest.approx(want.variance, rel=1e-12)
            lam = lams / want.scale
            np.testing.assert_allclose(one.fn(lam), want.fn(lam), rtol=1e-12, atol=1e-15)
            # 2 fn / lam^2 amplifies fn's rounding (~1e-16 absolute) at lam = 1e-3 / sd: skip those
            big = (np.abs(lams) > 0.1) | (lams == 0)
            np.testing.assert_allclose(one.ratio(lam[big]), want.ratio(lam[big]), rtol=1e-9)
            np.testing.assert_allclose(one.se(lam), want.se(lam), rtol=1e-9, atol=1e-12)
            grid, mask = one.grid(-1)
            np.testing.assert_allclose(grid[mask], want.grid(-1), rtol=1e-14)


def test_exact_sub_gaussian_ratio_is_convex_so_its_sup_is_at_an_endpoint():
    """The package takes sup 2 Lambda / lam^2 of an exact CGF at the endpoints (0 and
    lam_max) because the ratio is convex on the domain. Checked here on Lambda written
    directly from its definition, for every sign pattern of kappa: second differences
    on a fine grid are >= 0, and no grid point beats the package's sigma^2."""
    rng = np.random.default_rng(11)
    kappas = _kappas(rng, 16, 6)
    with jax.enable_x64(True):
        for e, kap in enumerate(kappas):
            A, k = rng.uniform(0, 1, 6) * rng.choice([0.0, 1.0]), 2.0
            kmax = kap.max()
            hi = 0.999 / kmax if kmax > 0 else 50.0
            lam = np.linspace(1e-3 * hi, hi, 4001)
            x = lam[:, None] * kap
            Lam = np.sum(k * (-0.5 * np.log1p(-x) - 0.5 * x) + lam[:, None] ** 2 * A / (2 * (1 - x)), 1)
            r = 2 * Lam / lam**2
            second = r[2:] - 2 * r[1:-1] + r[:-2]
            assert second.min() >= -1e-9 * np.abs(r).max(), (e, second.min())
            c = cgf.exact(kap, A, k)
            c = jax.tree_util.tree_map(jnp.asarray, c)
            sigma2 = float(bounds.subgaussian_sigma2(c, jnp.float64(hi)))
            var = float(c.variance)
            assert sigma2 == pytest.approx(max(var, r[-1]), rel=1e-9)
            assert r.max() <= sigma2 * (1 + 1e-9)
