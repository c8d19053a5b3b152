"""The Langevin kernel (kdsim/langevin.py) runs exactly the Euler--Maruyama chain;
divergence is sticky; step-size schedules are the optax and SGLD ones."""

import jax
import jax.numpy as jnp
import numpy as np

from kdsim import closed_form, langevin, streams
from kdsim.config import SimConfig, resolve


def _quadratic_kernel(A, b, h):
    return langevin.build_kernel(lambda w, _: A @ w - b, langevin.schedule("constant", h, 1))


def test_step_is_euler_maruyama_with_the_stream_noise():
    A = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    b = jnp.array([0.5, -1.0])
    h = 0.05
    kernel = _quadratic_kernel(A, b, h)
    key = jax.random.key(7)
    w0 = jnp.array([1.0, -2.0])
    state, _ = langevin.run(kernel, key, kernel.init(w0), 0, 5)
    w = np.array(w0, np.float64)
    for t in range(5):
        xi = np.asarray(jax.random.normal(streams.step_key(key, t), (2,)), np.float64)
        w = w - h * (np.asarray(A, np.float64) @ w - np.asarray(b, np.float64)) + np.sqrt(2 * h) * xi
    np.testing.assert_allclose(np.asarray(state.position), w, rtol=1e-5, atol=1e-6)
    assert not bool(state.diverged) and int(state.diverged_step) == -1


def test_segments_are_bit_identical_to_one_run():
    kernel = _quadratic_kernel(jnp.eye(3), jnp.ones(3), 0.1)
    key = jax.random.key(1)
    s0 = kernel.init(jnp.zeros(3))
    whole, _ = langevin.run(kernel, key, s0, 0, 30)
    part, _ = langevin.run(kernel, key, s0, 0, 12)
    part, _ = langevin.run(kernel, key, part, 12, 18)
    np.testing.assert_array_equal(np.asarray(whole.position), np.asarray(part.position))


def test_divergence_is_detected_sticky_and_frozen():
    # h lambda = 3 > 2: the chain explodes geometrically and overflows float32.
    kernel = _quadratic_kernel(jnp.eye(2) * 30.0, jnp.zeros(2), 0.1)
    state, _ = langevin.run(kernel, jax.random.key(0), kernel.init(jnp.ones(2)), 0, 400)
    assert bool(state.diverged)
    step = int(state.diverged_step)
    assert 0 < step < 400
    assert np.all(np.isfinite(np.asarray(state.position)))   # frozen at the last finite value
    # the recorded step is the first non-finite one: running one step fewer stays finite
    before, _ = langevin.run(kernel, jax.random.key(0), kernel.init(jnp.ones(2)), 0, step)
    assert not bool(before.diverged)
    np.testing.assert_array_equal(np.asarray(before.position), np.asarray(state.position))


def test_accumulator_sees_every_pre_step_state():
    kernel = _quadratic_kernel(jnp.eye(1), jnp.zeros(1), 0.01)
    acc_fn = lambda acc, st, info: acc + 1.0
    _, acc = langevin.run(kernel, jax.random.key(0), kernel.init(jnp.zeros(1)), 0, 17,
                          accumulate=acc_fn, acc_init=jnp.zeros(()))
    assert float(acc) == 17.0


def test_pytree_positions_get_independent_noise():
    key = jax.random.key(3)
    draws = langevin.gaussian_like(key, {"a": jnp.zeros(4), "b": jnp.zeros(4)})
    assert not np.allclose(np.asarray(draws["a"]), np.asarray(draws["b"]))


def test_float64_runaway_is_flagged_by_the_region_test_before_it_overflows():
    # |1 - h lambda| = 1.5: in float64 the chain grows like 1.5^T (1e35 after 200 steps)
    # and never overflows, so only the escape test can catch it.
    lam, h, dim, gamma, s0, s_init = 25.0, 0.1, 4, 20.0, 1.0, 1.0
    with jax.enable_x64(True):
        w0 = jnp.ones(dim, jnp.float64)
        plain = _quadratic_kernel(jnp.eye(dim) * lam, jnp.zeros(dim), h)
        noise = jnp.zeros(dim, jnp.float64)          # deterministic: w_t = (1 - h lam)^t w0
        state = plain.init(w0)
        for t in range(200):
            state, _ = plain.update(state, noise, jnp.int32(t))
        assert not bool(state.diverged)                # finite garbage without the test
        assert np.isfinite(np.asarray(state.position)).all()
        assert abs(float(state.position[0])) > 1e30

        limit = langevin.escape_limit(w0, gamma, s0, s_init)
        # the documented limit, computed here independently
        expected = 1e8 * dim * max(1.0, (s_init / s0) ** 2, gamma * s0**2)
        assert float(limit) == expected
        guarded = langevin.build_kernel(lambda w, _: lam * w, langevin.schedule("constant", h, 1),
                                        escaped=langevin.region_test(s0, limit))
        state = guarded.init(w0)
        for t in range(200):
            state, _ = guarded.update(state, noise, jnp.int32(t))
    # R_t = (1 - h lam)^(2 (t + 1)) dim / s0^2 after step t: the first step above the limit
    R = [(1 - h * lam) ** (2 * (t + 1)) * dim / s0**2 for t in range(200)]
    first = next(t for t, r in enumerate(R) if r > expected)
    assert bool(state.diverged) and int(state.diverged_step) == first
    # frozen at the last state inside the region, exactly as for a non-finite proposal
    np.testing.assert_allclose(np.asarray(state.position), (1 - h * lam) ** first * np.ones(dim),
                               rtol=1e-12)


def test_prior_normalised_norm_uses_per_leaf_scales():
    tree = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
    scales = {"a": 2.0, "b": 0.5}
    R = langevin.prior_normalised_sq_norm(tree, 2.0, scales)
    assert float(R) == (1 + 4) / (4 * 4) + 9 / (4 * 0.25)
    limit = langevin.escape_limit(tree, gamma=3.0, prior_scale=2.0, init_scale=1.0, leaf_scales=scales)
    assert float(limit) == 1e8 * 3 * max(1.0, 0.25, 3.0 * 4 * 4)
    assert bool(langevin.region_test(2.0, 1.0, scales)(tree))          # R > 1
    assert not bool(langevin.region_test(2.0, 10.0, scales)(tree))
    assert bool(langevin.region_test(2.0, 10.0, scales)({"a": jnp.array([np.nan, 0.0]),
                                                          "b": jnp.zeros((1, 1))}))


def test_schedules_are_the_optax_and_sgld_ones():
    hs = langevin.step_sizes("polynomial", 0.1, 4, 10.0)
    np.testing.assert_allclose(hs, 0.1 * (10.0 / (10.0 + np.arange(4))) ** 0.55, rtol=1e-12)
    cos = langevin.step_sizes("cosine", 0.1, 5)
    np.testing.assert_allclose(cos, 0.05 * (1 + np.cos(np.pi * np.arange(5) / 5)), rtol=1e-12)
    # a constant "schedule" iterated step by step is the closed-form power formula
    lam = np.array([0.5, 3.0, 9.0])
    R, cov = closed_form._scheduled_terms(lam, np.full(40, 0.05), 1.3)
    a, rho2, b = closed_form._power_terms(lam, 0.05, 40)
    np.testing.assert_allclose(R, a / lam, rtol=1e-10)
    np.testing.assert_allclose(cov, rho2 * 1.3**2 + 2 * b / (lam * (2 - 0.05 * lam)), rtol=1e-10)
    cfg = SimConfig.from_dict({"task": {"d": 3}, "student": {"langevin": {"schedule": "cosine"}}})
    assert "schedule differs" in resolve(cfg).girsanov_reason
