"""Sharpness by HVPs against exact Hessians (SPEC §5, §8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from kdsim import evaluation, run_populations
from kdsim.estimators import sharpness
from kdsim.stats import bonferroni_z


def _nonquadratic():
    """A small non-quadratic function with a mixed-sign Hessian, on a pytree."""
    A = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)))

    def f(params):
        w, b = params["w"], params["b"]
        h = A @ w + b
        return jnp.sum(jnp.log(jnp.cosh(h))) - 0.3 * jnp.sum(w**2) + 0.1 * jnp.sum(w**4) + jnp.sum(b * w[:1])

    point = {"w": jnp.asarray([0.3, -0.2, 0.5, 0.1]), "b": jnp.asarray([0.2])}
    return f, point


def _exact_hessian(f, point):
    flat, unravel = jax.flatten_util.ravel_pytree(point)
    return np.asarray(jax.hessian(lambda v: f(unravel(v)))(flat))


def test_power_iteration_and_hutchinson_match_jax_hessian():
    with jax.enable_x64(True):
        f, point = _nonquadratic()
        point = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), point)
        H = _exact_hessian(f, point)
        ev = np.linalg.eigvalsh(H)
        key = jax.random.key(0)
        top = float(sharpness.top_eigenvalue(f, point, key, 500))
        big = float(sharpness.largest_abs_eigenvalue(f, point, key, 500))
        assert top == pytest.approx(ev[-1], rel=1e-6)
        assert big == pytest.approx(np.abs(ev).max(), rel=1e-6)
        tr, se = (float(x) for x in sharpness.hutchinson_trace(f, point, key, 1000))
        assert abs(tr - np.trace(H)) < bonferroni_z(1) * se and se > 0


def test_top_eigenvalue_when_the_dominant_one_is_negative():
    with jax.enable_x64(True):
        H = jnp.diag(jnp.asarray([-5.0, 1.0, 2.0]))
        f = lambda w: 0.5 * w @ H @ w
        w = jnp.zeros(3)
        assert float(sharpness.top_eigenvalue(f, w, jax.random.key(1), 300)) == pytest.approx(2.0, rel=1e-6)
        assert float(sharpness.largest_abs_eigenvalue(f, w, jax.random.key(1), 300)) == pytest.approx(5.0, rel=1e-6)


def test_sam_against_the_exact_maximum_over_the_ball():
    """Quadratic f: the exact max over ||e|| <= rho (trust region) bounds SAM's one step,
    and SAM is first-order exact as rho -> 0."""
    rng = np.random.default_rng(2)
    B = rng.normal(size=(4, 4))
    H = B @ B.T
    g0 = rng.normal(size=4)
    with jax.enable_x64(True):
        f = lambda w: 0.5 * w @ jnp.asarray(H) @ w + jnp.asarray(g0) @ w
        w0 = jnp.zeros(4)
        ratios = []
        for rho in (1.0, 0.1, 0.01):
            sam = float(sharpness.sam_sharpness(f, w0, rho))
            cons = {"type": "ineq", "fun": lambda e: rho**2 - e @ e}
            best = -min((minimize(lambda e: -(0.5 * e @ H @ e + g0 @ e), x0, constraints=[cons])
                         for x0 in rng.normal(size=(8, 4)) * rho / 4), key=lambda r: r.fun).fun
            assert sam <= best + 1e-9
            ratios.append(sam / best)
        assert ratios[2] > 0.99 and ratios[0] < ratios[2]


def test_laplace_needs_more_particles_than_dimensions():
    parts = np.random.default_rng(0).normal(size=(200, 4))
    with jax.enable_x64(True):
        H = np.asarray(sharpness.laplace_hessian(jnp.asarray(parts), gamma=1.0, prior_scale=1e6))
    np.testing.assert_allclose(H, np.eye(4), atol=0.35)
    run = run_populations({"task": {"d": 4, "k": 2, "n": 32}, "teacher": {"num_steps": 30},
                           "num_datasets": 1, "num_particles": 8})
    cols = evaluation._sharpness_columns(run, np.ones((1, 8), bool))
    assert np.isnan(cols["sharpness_laplace_top"][0])


def test_linear_teacher_sharpness_matches_exact_hessian():
    """Loss Hessian I_k (x) Cxx, gap Hessian I_k (x) (Sx - Cxx); Laplace from the particles."""
    run = run_populations({"task": {"d": 4, "k": 2, "n": 32}, "teacher": {"num_steps": 600},
                           "student": {"langevin": {"num_steps": 1}},
                           "num_datasets": 3, "num_particles": 2000})
    ok = np.ones((3, 2000), bool)
    cols = evaluation._sharpness_columns(run, ok)
    np.testing.assert_allclose(cols["sharpness_top"], cols["sharpness_top_exact"], rtol=1e-6)
    np.testing.assert_allclose(cols["gap_curvature"], cols["gap_curvature_exact"], rtol=1e-6)
    z = (cols["sharpness_trace"] - cols["sharpness_trace_exact"]) / cols["sharpness_trace_se"]
    assert np.max(np.abs(z)) < bonferroni_z(3)
    # Laplace: Cov ~ (gamma H + I/s0^2)^{-1} near stationarity; 2000 particles in 8 dims
    np.testing.assert_allclose(cols["sharpness_laplace_trace"], cols["sharpness_trace_exact"], rtol=0.1)
    assert np.all(cols["rho"] > 0) and np.all(cols["gap_gradient"] > 0)
