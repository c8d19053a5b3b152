"""The population engine (kdsim/populations.py): autodiff energy gradients against the
SPEC energies, the vectorised population against single chains, particle chunks, the
Girsanov accumulator, the linear fast path and the matmul precision. Layouts draw the same
numbers and agree to float32 rounding (SPEC §11: tests/helpers.py holds the tolerances)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kdsim
from kdsim import langevin, models, populations, streams
from kdsim.config import ConfigError, LangevinNumeric, SimConfig, resolve

from helpers import assert_layout_close, builtin_model, flat_states, initial_draws


SMALL = {"task": {"d": 4, "k": 2, "n": 32}, "teacher": {"num_steps": 60},
         "student": {"langevin": {"num_steps": 40}}, "num_datasets": 2, "num_particles": 10}
# the student runs as long as the teacher: the Girsanov sum applies
SMALL_G = {**SMALL, "student": {"langevin": {"num_steps": 60}}}


def _pops(cfg):
    return kdsim.run_populations(cfg, progress=False).populations


def test_particle_chunks_give_the_same_populations():
    """Draws are keyed by global particle index: chunking (a padded last chunk included)
    gives the whole run's states and Girsanov sums to float32 rounding, the same
    divergence flags, and the same chunked run again bit for bit."""
    whole, chunked = _pops(SMALL_G), _pops({**SMALL_G, "particle_chunk": 4})
    assert whole.student_sub is not None and whole.scratch is not None
    assert whole.girsanov is not None
    for name in ("teacher", "student", "student_sub", "scratch", "girsanov"):
        assert_layout_close(getattr(chunked, name), getattr(whole, name), name)
    for name in ("diverged_T", "diverged_S", "diverged_step_T"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name), err_msg=name)
    again = _pops({**SMALL_G, "particle_chunk": 4})
    np.testing.assert_array_equal(again.student, chunked.student)
    assert chunked.teacher.shape == whole.teacher.shape


MLP_G = {"task": {"name": "mlp_regression", "d": 3, "k": 1, "n": 8, "n_test": 8},
         "teacher": {"num_steps": 20, "model": {"width": 4}},
         "student": {"alpha": 0.4, "langevin": {"num_steps": 20}, "model": {"width": 4}},
         "num_datasets": 1, "num_particles": 6}         # same architecture: Girsanov applies


@pytest.mark.parametrize("task,chunk", [("mlp_regression", 4), ("mlp_classification", 1)])
def test_particle_chunks_in_an_mlp_task(task, chunk):
    """Chunks of 4 particles (a padded last chunk included) or of 1 (a batch of one
    chain) end in the whole run's states and Girsanov sums to float32 rounding."""
    cfg = {**MLP_G, "task": {**MLP_G["task"], "name": task}}
    whole = _pops(cfg)
    assert whole.girsanov is not None and whole.scratch is not None
    chunked = _pops({**cfg, "particle_chunk": chunk})
    for name in ("teacher", "student", "scratch", "girsanov"):
        assert_layout_close(flat_states(getattr(chunked, name)), flat_states(getattr(whole, name)),
                            f"{name}, chunks of {chunk}")
    np.testing.assert_array_equal(chunked.diverged_S, whole.diverged_S)


def test_linear_step_cost_does_not_grow_with_n():
    """The compiled teacher segment sees the data only through X^T X / n and Y^T X / n."""
    from kdsim.progress import SEGMENT_STEPS
    flops = []
    for n in (64, 65536):
        res = resolve(SimConfig.from_dict({"task": {"d": 16, "k": 2, "n": n}, "num_particles": 8}))
        E, P, k, d = 16, 8, 2, 16
        state = populations._initial_state(jnp.zeros((E, P, k, d)))
        keys = jax.random.split(jax.random.key(0), E * P).reshape(E, P)
        C, B = jnp.zeros((E, d, d)), jnp.zeros((E, k, d))
        p = jax.tree_util.tree_map(jnp.float32, res.numeric.teacher)
        compiled = populations._linear_segment.lower(
            state, None, jnp.int32(0), keys, C, B, C, B, p, p, num_steps=SEGMENT_STEPS,
            shared_B=True, girsanov=False, schedule="constant", phase_steps=SEGMENT_STEPS).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops.append(cost["flops"])
    assert flops[0] == flops[1] > 0


def test_engine_precision_is_validated_and_keeps_float32_rounding():
    with pytest.raises(ConfigError, match="engine_precision"):
        SimConfig.from_dict({"engine_precision": "fastest"})
    a = _pops(SMALL)
    b = _pops({**SMALL, "engine_precision": "highest"})
    # on a CPU a float32 matmul is exact float32 at any precision setting
    assert_layout_close(b.teacher, a.teacher, "teacher")
    assert_layout_close(b.student, a.student, "student")


# (MLP populations in other batch shapes: test_particle_chunks_in_an_mlp_task here, split
# over two processes: tests/test_sharding.py)


@pytest.mark.parametrize("classification", [False, True])
def test_student_energy_gradient_matches_the_spec_energy(classification):
    """The engine's autodiff gradients (one vjp, two cotangents) against ``jax.grad`` of
    the SPEC energies written out here, with per-leaf prior scales that differ by leaf."""
    model, prep = builtin_model(width=5, depth=1, out=3, d=4)
    both = initial_draws(prep, 2, init_scale=1.0)
    w, w_T = (jax.tree_util.tree_map(lambda x: x[i], both) for i in range(2))
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    Y = jnp.asarray(rng.integers(0, 3, 7)) if classification else jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    p = LangevinNumeric(20.0, 0.8, 1.0, 1e-3)
    p_T = LangevinNumeric(30.0, 1.3, 1.0, 1e-3)
    alpha, tau, nu_T = 0.3, 2.0, 0.4
    s_leaf = {"NTKDense_0": {"bias": 2.0, "kernel": 0.5}, "NTKDense_1": {"bias": 1.5, "kernel": 0.25}}
    f_T = model.apply(w_T, X)
    if classification:
        target = jax.nn.softmax(f_T / tau)
    else:
        target = f_T + nu_T * jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)

    def task(v):
        f = model.apply(v, X)
        if classification:
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(f), Y[:, None], 1))
        return jnp.mean(0.5 * jnp.sum((Y - f) ** 2, 1))

    def kd(v):
        f = model.apply(v, X)
        if classification:
            q = jax.nn.log_softmax(f / tau)
            return tau**2 * jnp.mean(jnp.sum(target * (jnp.log(target) - q), 1))
        return jnp.mean(0.5 * jnp.sum((target - f) ** 2, 1))

    def prior(v, s0):
        return sum(jnp.sum(v[l][k] ** 2) / (2 * s0**2 * s_leaf[l][k] ** 2) for l in v for k in v[l])

    U_S = lambda v: p.gamma * (alpha * task(v) + (1 - alpha) * kd(v)) + prior(v, p.prior_scale)
    U_T = lambda v: p_T.gamma * task(v) + prior(v, p_T.prior_scale)
    inv = lambda q: jax.tree_util.tree_map(lambda s: 1.0 / (q.prior_scale * s) ** 2, s_leaf)
    grad = populations.student_energy_grad(model.apply, classification, p, p_T, alpha, tau,
                                           inv(p), inv(p_T), girsanov=True)
    g_S, diff = grad(w, (X, Y), target)
    flat = lambda t: ravel_pytree(t)[0]
    np.testing.assert_allclose(flat(g_S), flat(jax.grad(U_S)(w)), rtol=2e-4, atol=2e-4)
    expect = flat(jax.grad(U_S)(w)) - flat(jax.grad(U_T)(w))
    np.testing.assert_allclose(flat(diff), expect, rtol=2e-4, atol=2e-4)
    g_T = populations.teacher_energy_grad(model.apply, classification, p_T, inv(p_T))(w, (X, Y))
    np.testing.assert_allclose(flat(g_T), flat(jax.grad(U_T)(w)), rtol=2e-4, atol=2e-4)


def test_population_engine_is_the_single_chain_euler_maruyama():
    """The vectorised population equals particle-by-particle `langevin.run`, same keys."""
    cfg = SimConfig.from_dict({"task": {"name": "mlp_regression", "d": 4, "n": 32, "k": 2},
                               "teacher": {"num_steps": 5, "model": {"width": 8}},
                               "num_datasets": 2, "num_particles": 3})
    run = kdsim.run_populations(cfg)
    res = resolve(cfg)
    teacher = run.models[0]
    root = streams.root_key(cfg.seed)
    p = jax.tree_util.tree_map(jnp.float32, res.numeric.teacher)
    inv = jax.tree_util.tree_map(lambda s: 1.0 / (p.prior_scale * s) ** 2, teacher.scale_tree(jnp.float32))
    grad = populations.teacher_energy_grad(teacher.apply, False, p, inv)
    kernel = langevin.build_kernel(lambda w, b: grad(w, b), langevin.schedule("constant", p.step_size, 5))
    zeros = teacher.structure.zeros(jnp.float32)

    @jax.jit
    def one_chain(e, i, X, Y):
        w0 = jax.tree_util.tree_map(lambda z: p.init_scale * z, langevin.gaussian_like(
            streams.particle_key(root, "teacher_init", e, i), zeros))
        return langevin.run(kernel, streams.particle_key(root, "teacher_noise", e, i),
                            kernel.init(w0), 0, 5, (X, Y))[0]

    for e in range(2):
        for i in range(3):
            st = one_chain(e, i, jnp.asarray(run.data.X[e]), jnp.asarray(run.data.Y[e]))
            got = jax.tree_util.tree_map(lambda x: x[e, i], run.populations.teacher)
            np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(st.position)[0], rtol=1e-5, atol=1e-6)


def test_girsanov_upper_bounds_the_exact_kl_and_grows_with_steps():
    vals = []
    for steps in (50, 200, 800):
        res = kdsim.simulate({"task": {"d": 3, "n": 32}, "teacher": {"num_steps": steps},
                              "student": {"alpha": 0.3, "teacher_noise": 0.3},
                              "num_datasets": 3, "num_particles": 128})
        df = res.per_dataset
        assert np.all(df["kl_girsanov"] - 3 * df["kl_girsanov_se"] >= df["kl_exact"])
        vals.append(df["kl_girsanov"].mean())
    assert vals[0] < vals[1] < vals[2]
    # past the burn-in the path-space sum grows about linearly in the number of steps
    assert 2.5 < vals[2] / vals[1] < 4.5


def test_autodiff_energy_gradient_matches_finite_differences():
    """The engine's teacher and student gradients (built-in CNN, float64) against central
    finite differences of the SPEC §2 energies along random directions."""
    D, K = 6, 3
    with jax.enable_x64(True):
        cfg = kdsim.ModelConfig(kind="cnn", channels=3, kernel_size=3, depth=2, activation="tanh")
        prep = models.prepare(models.builtin(cfg, K, (D,), "float64"), role="teacher_model",
                              input_shape=(D,), out=K, dtype="float64")
        rng = np.random.default_rng(3)
        zeros = prep.structure.zeros(jnp.float64)
        w = langevin.gaussian_like(jax.random.key(4), zeros)
        w_T = langevin.gaussian_like(jax.random.key(5), zeros)
        X = jnp.asarray(rng.normal(size=(9, D)))
        Y = jnp.asarray(rng.integers(0, K, 9))
        p = LangevinNumeric(15.0, 0.9, 1.0, 1e-3)
        p_T = LangevinNumeric(25.0, 1.2, 1.0, 1e-3)
        inv = lambda q: jax.tree_util.tree_map(lambda s: 1.0 / (q.prior_scale * s) ** 2,
                                               prep.scale_tree(jnp.float64))
        target = jax.nn.softmax(prep.apply(w_T, X) / 1.5)
        flat, unravel = ravel_pytree(w)

        def energy_S(u):
            f = prep.apply(unravel(u), X)
            task = -jnp.mean(jax.nn.log_softmax(f)[jnp.arange(9), Y])
            kd = 1.5**2 * jnp.mean(jnp.sum(target * (jnp.log(target) - jax.nn.log_softmax(f / 1.5)), 1))
            return p.gamma * (0.4 * task + 0.6 * kd) + jnp.sum(u * u) / (2 * p.prior_scale**2)

        grad = populations.student_energy_grad(prep.apply, True, p, p_T, 0.4, 1.5, inv(p), inv(p_T),
                                               girsanov=False)
        g = ravel_pytree(grad(w, (X, Y), target))[0]
        for i in range(4):
            v = jnp.asarray(rng.normal(size=flat.shape))
            eps = 1e-5
            fd = (energy_S(flat + eps * v) - energy_S(flat - eps * v)) / (2 * eps)
            assert float(jnp.dot(g, v)) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_linear_sufficient_statistics_gradient_matches_autodiff():
    """The linear fast path ``gamma (W Cxx - Cyx) + W / s0^2`` is the gradient of
    ``gamma * mean_i 0.5 ||y_i - W x_i||^2 + ||W||^2 / (2 s0^2)`` (data, not statistics)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        X, Y = rng.normal(size=(40, 5)), rng.normal(size=(40, 2))
        W = jnp.asarray(rng.normal(size=(2, 5)))
        p = LangevinNumeric(12.0, 0.7, 1.0, 1e-3)
        C, B = jnp.asarray(X.T @ X / 40), jnp.asarray(Y.T @ X / 40)
        fast = populations._linear_grad(p)(W, (C, B), None)
        energy = lambda W: p.gamma * 0.5 * jnp.mean(jnp.sum((Y - X @ W.T) ** 2, 1)) \
            + jnp.sum(W * W) / (2 * p.prior_scale**2)
        np.testing.assert_allclose(np.asarray(fast), np.asarray(jax.grad(energy)(W)), rtol=1e-12)
