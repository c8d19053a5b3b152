"""Fixed-order arithmetic (kdsim.ordered) and the MLP engine's hand-written passes built on
it: the right values (float64, against NumPy / flax / autodiff), and each particle's
float32 result the same in any batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kdsim import models, ordered, populations
from kdsim.config import LangevinNumeric

SUBSETS = [(0, 1), (7, 10), (100, 300)]     # alone, a small batch, most of the population


def _same_in_every_batch(fn, *population):
    """fn's rows for each sub-batch equal its rows for the whole population, bit for bit."""
    whole = [np.asarray(x) for x in jax.tree_util.tree_leaves(fn(*population))]
    for lo, hi in SUBSETS:
        part = jax.tree_util.tree_leaves(fn(*(jax.tree_util.tree_map(lambda x: x[lo:hi], p) for p in population)))
        for a, b in zip(part, whole):
            np.testing.assert_array_equal(np.asarray(a), b[lo:hi], err_msg=f"batch {lo}:{hi}")


@pytest.mark.parametrize("K", [1, 3, ordered.UNROLL_MAX + 1])
def test_matmul_sums_and_max_are_exact_and_do_not_depend_on_the_batch(K):
    rng = np.random.default_rng(K)
    A, B = rng.normal(size=(300, 4, K)), rng.normal(size=(K, 5))
    with jax.enable_x64(True):
        got = jax.vmap(ordered.matmul, in_axes=(0, None))(jnp.asarray(A), jnp.asarray(B))
        sums = jax.vmap(lambda a: ordered.sum(a, axis=1))(jnp.asarray(A))
        totals = jax.vmap(ordered.total)(jnp.asarray(A))
        maxima = jax.vmap(lambda a: ordered.max(a, axis=1))(-jnp.abs(jnp.asarray(A)))
    scale = np.abs(A).max() * np.abs(B).max() * K
    np.testing.assert_allclose(got, A @ B, rtol=0, atol=1e-14 * scale)
    np.testing.assert_allclose(sums, A.sum(axis=2), rtol=0, atol=1e-14 * np.abs(A).max() * K)
    np.testing.assert_allclose(totals, A.sum(axis=(1, 2)), rtol=0, atol=1e-14 * np.abs(A).max() * 4 * K)
    np.testing.assert_array_equal(maxima, (-np.abs(A)).max(axis=2))     # exact, -inf padding
    A32, B32 = jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)
    _same_in_every_batch(jax.jit(jax.vmap(lambda a: ordered.matmul(a, B32))), A32)
    _same_in_every_batch(jax.jit(jax.vmap(lambda a: (ordered.sum(a, 0), ordered.total(a)))), A32)


def test_the_rolled_loop_continues_the_unrolled_chain(monkeypatch):
    """Above UNROLL_MAX terms the chain runs as a loop over blocks; it is the same chain,
    so unrolling everything gives the same bits."""
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.normal(size=(6, 3, 300)), jnp.float32)
    B = jnp.asarray(rng.normal(size=(300, 4)), jnp.float32)
    rolled = jax.jit(jax.vmap(lambda a: (ordered.matmul(a, B), ordered.sum(a, 1))))(A)
    monkeypatch.setattr(ordered, "UNROLL_MAX", 1000)
    unrolled = jax.jit(jax.vmap(lambda a: (ordered.matmul(a, B), ordered.sum(a, 1))))(A)
    for a, b in zip(rolled, unrolled):
        np.testing.assert_array_equal(a, b)
    jaxpr = str(jax.make_jaxpr(lambda a: ordered.matmul(a, B))(A[0]))
    assert "while" not in jaxpr                      # unrolled now; rolled above had a loop


def test_matmul_keeps_leading_axes():
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(2, 3, 7)), rng.normal(size=(7, 4))
    with jax.enable_x64(True):
        got = ordered.matmul(jnp.asarray(A), jnp.asarray(B))
    np.testing.assert_allclose(got, A @ B, rtol=1e-13, atol=1e-13)


def test_matmul_names_mismatched_shapes():
    with pytest.raises(ValueError, match="contracted dimensions"):
        ordered.matmul(jnp.zeros((2, 3)), jnp.zeros((4, 5)))


@pytest.mark.parametrize("activation,depth,n", [(a, 2, 20) for a in sorted(models.ACTIVATIONS)]
                         + [("tanh", 1, ordered.UNROLL_MAX + 22)])
def test_mlp_forward_and_backward_are_the_flax_network_and_its_vjp(activation, depth, n):
    """Every activation through two hidden layers; and n > UNROLL_MAX, where the sums
    over the data take the rolled form."""
    model = models.MLP(width=6, depth=depth, out=3, activation=activation)
    with jax.enable_x64(True):
        rng = np.random.default_rng(depth)
        X = jnp.asarray(rng.normal(size=(n, 5)))
        tmpl = models.param_template(model, 5, jnp.float64)
        w = models.init_params(jax.random.key(depth), tmpl, jnp.float64(1.0))
        g_out = jnp.asarray(rng.normal(size=(n, 3)))
        f, cache = models.forward(w, X, activation)
        ref_f, vjp = jax.vjp(lambda v: model.apply({"params": v}, X), w)
        np.testing.assert_allclose(f, ref_f, rtol=1e-12, atol=1e-12)
        got = models.backward(w, cache, g_out, activation)
        (ref,) = vjp(g_out)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
        np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(ref)[0], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("classification", [False, True])
def test_output_cotangents_are_the_loss_gradients(classification):
    task_loss, kd_loss = populations.prediction_losses(classification)
    task_cot, kd_cot = populations.output_cotangents(classification)
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        f = jnp.asarray(rng.normal(size=(9, 4)) * 3)
        if classification:
            Y = jnp.asarray(rng.integers(0, 4, size=9))
            target = jax.nn.softmax(jnp.asarray(rng.normal(size=(9, 4))) / 0.7)
        else:
            Y, target = jnp.asarray(rng.normal(size=(9, 4))), jnp.asarray(rng.normal(size=(9, 4)))
        tau = jnp.float64(0.7)
        np.testing.assert_allclose(task_cot(f, Y), jax.grad(task_loss)(f, Y), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(kd_cot(f, target, tau), jax.grad(kd_loss)(f, target, tau),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("classification", [False, True])
def test_an_mlp_particle_gradient_does_not_depend_on_the_batch(classification):
    """The student's energy gradient and Girsanov difference (the engine's whole step
    arithmetic besides the noise) for 300 particles: every sub-batch reproduces its
    particles' bits. A vmapped autodiff gradient does not (batch_invariance.md)."""
    model = models.MLP(width=16, depth=1, out=3, activation="tanh")
    rng = np.random.default_rng(2)
    X = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    Y = jnp.asarray(rng.integers(0, 3, size=64) if classification else rng.normal(size=(64, 3)),
                    jnp.int32 if classification else jnp.float32)
    tmpl = models.param_template(model, 8)
    w = jax.vmap(lambda k: models.init_params(k, tmpl, jnp.float32(1.0)))(jax.random.split(jax.random.key(0), 300))
    target = jnp.asarray(rng.dirichlet(np.ones(3), size=(300, 64)) if classification
                         else rng.normal(size=(300, 64, 3)), jnp.float32)
    p = LangevinNumeric(*(jnp.float32(v) for v in (40.0, 1.2, 1.0, 1e-3)))
    p_T = LangevinNumeric(*(jnp.float32(v) for v in (60.0, 0.9, 1.0, 1e-3)))
    grad = populations.student_energy_grad(model, classification, p, p_T, jnp.float32(0.3),
                                           jnp.float32(2.0), girsanov=True)
    energy = jax.jit(jax.vmap(lambda w, t: grad(w, (X, Y), t)))
    _same_in_every_batch(energy, w, target)
    sq = jax.jit(jax.vmap(populations._sq_norm))
    _same_in_every_batch(sq, w)
