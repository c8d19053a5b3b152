"""The Langevin kernel runs exactly the Euler--Maruyama chain; divergence is sticky."""

import jax
import jax.numpy as jnp
import numpy as np

from kdsim import langevin, streams


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
