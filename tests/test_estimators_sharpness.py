"""Sharpness by HVPs against exact Hessians (SPEC §5, §8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from kdsim import evaluation, langevin, models, run_populations
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
        assert abs(tr - np.trace(H)) < bonferroni_z(1) * se
        # the error is not inflated: Rademacher probes give Var(z^T H z) = 2 sum_{i!=j} H_ij^2
        # exactly; 1000 probes estimate its root to ~2% (measured over seeds), 10% is 5 of those
        se_exact = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 1000)
        assert abs(se / se_exact - 1) < 0.1, (se, se_exact)


def test_top_eigenvalue_when_the_dominant_one_is_negative():
    with jax.enable_x64(True):
        H = jnp.diag(jnp.asarray([-5.0, 1.0, 2.0]))
        f = lambda w: 0.5 * w @ H @ w
        w = jnp.zeros(3)
        assert float(sharpness.top_eigenvalue(f, w, jax.random.key(1), 300)) == pytest.approx(2.0, rel=1e-6)
        assert float(sharpness.largest_abs_eigenvalue(f, w, jax.random.key(1), 300)) == pytest.approx(5.0, rel=1e-6)


def test_dense_hessian_eigenvalues_match_finite_differences_and_a_known_spectrum():
    """The full-Hessian path (few parameters): every eigenvalue against a central finite
    difference of the gradient (independent of forward-over-reverse), and a diagonal
    quadratic whose spectrum is known."""
    with jax.enable_x64(True):
        f, point = _nonquadratic()
        point = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), point)
        flat, unravel = ravel_pytree(point)
        grad = jax.grad(lambda v: f(unravel(v)))
        h = 1e-5
        fd = np.stack([(np.asarray(grad(flat + h * e)) - np.asarray(grad(flat - h * e))) / (2 * h)
                       for e in np.eye(flat.size)], axis=1)
        want = np.linalg.eigvalsh(0.5 * (fd + fd.T))
        got = np.asarray(sharpness.hessian_eigenvalues(f, point))
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)
        assert want.min() < 0 < want.max()            # mixed signs: |min| and max both matter
        H = jnp.diag(jnp.asarray([-5.0, 1.0, 2.0]))
        got = sharpness.hessian_eigenvalues(lambda w: 0.5 * w @ H @ w, jnp.ones(3))
        np.testing.assert_allclose(got, [-5.0, 1.0, 2.0], rtol=1e-12)


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


def test_laplace_inverts_the_covariance_and_divides_by_gamma():
    """A non-identity covariance, gamma != 1 and a finite prior: dropping the inverse, the
    prior term or the 1/gamma would each change H. Checked exactly against NumPy on the
    same particles, and against the population value within the sampling error."""
    rng = np.random.default_rng(0)
    B = rng.normal(size=(4, 4))
    cov = B @ B.T / 4 + 0.5 * np.eye(4)
    gamma, s0 = 2.5, 1.5
    parts = rng.multivariate_normal(np.ones(4), cov, size=20_000)
    with jax.enable_x64(True):
        H = np.asarray(sharpness.laplace_hessian(jnp.asarray(parts), gamma=gamma, prior_scale=s0))
    expect = (np.linalg.inv(np.cov(parts, rowvar=False)) - np.eye(4) / s0**2) / gamma
    np.testing.assert_allclose(H, expect, rtol=1e-9, atol=1e-12)
    # the sample covariance's relative error is ~ sqrt(2 / 20000) = 1%: 5% is 5 of those
    truth = (np.linalg.inv(cov) - np.eye(4) / s0**2) / gamma
    assert np.linalg.norm(H - truth) < 0.05 * np.linalg.norm(truth)
    assert np.linalg.norm(np.linalg.inv(cov) - truth) > 0.5 * np.linalg.norm(truth)


def _sharpness_columns(run):
    """The sharpness stage of the evaluation pipeline on a run whose chains all survived."""
    ctx, _, _ = evaluation.context(run)
    assert ctx.ok.all()
    return evaluation.sharpness_stage(ctx, evaluation.Produced({}, {})).columns


def test_laplace_needs_more_particles_than_dimensions():
    run = run_populations({"task": {"d": 4, "k": 2, "n": 32}, "teacher": {"num_steps": 30},
                           "num_datasets": 1, "num_particles": 8})
    cols = _sharpness_columns(run)
    assert np.isnan(cols["sharpness_laplace_top"][0])


def test_linear_teacher_sharpness_matches_exact_hessian():
    """Loss Hessian I_k (x) Cxx, gap Hessian I_k (x) (Sx - Cxx), computed here from the
    datasets; Laplace from the particles."""
    run = run_populations({"task": {"d": 4, "k": 2, "n": 32}, "teacher": {"num_steps": 600},
                           "student": {"langevin": {"num_steps": 1}},
                           "num_datasets": 3, "num_particles": 2000})
    df, cfg = _sharpness_columns(run), run.config
    X = run.data.X
    Cxx = np.einsum("eni,enj->eij", X, X) / X.shape[1]
    sx = cfg.task.input_scale * np.arange(1, 5.0) ** (-cfg.task.input_decay)   # SPEC §3
    ev = np.linalg.eigvalsh(Cxx)
    top, trace = ev[:, -1], 2 * ev.sum(1)
    curvature = np.abs(np.linalg.eigvalsh(np.diag(sx) - Cxx)).max(1)
    np.testing.assert_allclose(df["sharpness_top"], top, rtol=1e-6)
    np.testing.assert_allclose(df["gap_curvature"], curvature, rtol=1e-6)
    z = (df["sharpness_trace"] - trace) / df["sharpness_trace_se"]
    assert np.max(np.abs(z)) < bonferroni_z(3)
    # 128 Rademacher probes of I_k (x) Cxx: se^2 = 2 k sum_{i!=j} Cxx_ij^2 / 128 exactly;
    # its estimate from 128 probes is good to ~6%: 25% is 4 of those
    off = np.sum(Cxx**2, (1, 2)) - np.sum(np.diagonal(Cxx, 0, 1, 2) ** 2, 1)
    np.testing.assert_allclose(df["sharpness_trace_se"], np.sqrt(2 * 2 * off / 128), rtol=0.25)
    # Laplace: Cov ~ (gamma H + I/s0^2)^{-1} near stationarity; 2000 particles in 8 dims
    np.testing.assert_allclose(df["sharpness_laplace_trace"], trace, rtol=0.1)
    assert np.all(df["rho"] > 0) and np.all(df["gap_gradient"] > 0)


def test_mlp_sharpness_matches_jax_hessian():
    model = models.MLP(width=6, depth=1, out=2, activation="tanh")
    with jax.enable_x64(True):
        tmpl = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.float64))["params"]
        w = langevin.gaussian_like(jax.random.key(0), jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, jnp.float64), tmpl))
        rng = np.random.default_rng(1)
        X = jnp.asarray(rng.normal(size=(20, 3)))
        Y = jnp.asarray(rng.normal(size=(20, 2)))
        f = lambda v: jnp.mean(0.5 * jnp.sum((Y - model.apply({"params": v}, X)) ** 2, -1))
        flat, unravel = ravel_pytree(w)
        H = np.asarray(jax.hessian(lambda u: f(unravel(u)))(flat))
        ev = np.linalg.eigvalsh(H)
        top = float(jax.jit(lambda k: sharpness.top_eigenvalue(f, w, k, 600))(jax.random.key(1)))
        assert top == pytest.approx(ev[-1], rel=1e-4)
        tr, se = (float(x) for x in jax.jit(lambda k: sharpness.hutchinson_trace(f, w, k, 500))(
            jax.random.key(2)))
        assert abs(tr - np.trace(H)) < bonferroni_z(1) * se
