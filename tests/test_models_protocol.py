"""The open engine (SPEC §9): any model through the protocol, gradients by autodiff,
per-leaf prior and initial scales, step-size schedules, and clear errors for models
that do not fit the task."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import kdsim
from kdsim import closed_form, langevin, models, populations, streams
from kdsim.config import LangevinNumeric, SimConfig, resolve
from kdsim.stats import bonferroni_z

D, K = 6, 3
CLS = {"task": {"name": "mlp_classification", "d": D, "n": 24, "n_test": 128, "num_classes": K},
       "teacher": {"num_steps": 30}, "student": {"alpha": 0.3},
       "num_datasets": 2, "num_particles": 8}


class ResCNN(nn.Module):
    """A CNN with LayerNorm and a residual connection, on sequences ``(m, length)``."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3,), padding="SAME")(x[..., None])
        h = h + nn.relu(nn.LayerNorm()(nn.Conv(4, (3,), padding="SAME")(h)))
        return nn.Dense(K)(h.mean(axis=1))


class NnxMLP(nnx.Module):
    def __init__(self, d, width, out, rngs):
        self.hidden = nnx.Linear(d, width, rngs=rngs)
        self.out = nnx.Linear(width, out, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _pair_model(width=5, out=K, d=D):
    """A model given as a pair of plain functions."""
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (d, width)) / math.sqrt(d), "b1": jnp.zeros(width),
                "w2": jax.random.normal(k2, (width, out)) / math.sqrt(width)}

    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]

    return kdsim.Model(init, apply, name="pair")


@pytest.fixture(scope="module")
def cnn_to_nnx():
    return kdsim.simulate(CLS, teacher_model=ResCNN(),
                          student_model=NnxMLP(D, 7, K, nnx.Rngs(0)))


def test_linen_cnn_teacher_distils_into_an_nnx_mlp_student(cnn_to_nnx):
    res = cnn_to_nnx
    df = res.per_dataset
    for col in ["gen_T", "gen_S", "gen_T_01", "gen_S_01", "gen_S_scratch", "test_loss_S",
                "klpred_convexity", "sharpness_top", "gap_curvature", "F_B0_upper", "F_B1_upper",
                "gen_S_F", "klF_convexity"]:
        assert np.all(np.isfinite(df[col])), col
    # different structures: no parameter-space KL, and the notes say why
    assert np.all(np.isnan(df["kl_girsanov"]))
    assert any("parameter structure differs" in n for n in res.notes)
    # the model metadata: classes and parameter counts, counted here from flax directly
    t_params = ResCNN().init(jax.random.key(0), jnp.zeros((1, D)))["params"]
    n_T = sum(x.size for x in jax.tree_util.tree_leaves(t_params))
    n_S = D * 7 + 7 + 7 * K + K
    assert res.meta["models"]["teacher"] == {"name": "ResCNN", "custom": True, "class": "ResCNN",
                                             "num_params": n_T, "scales": res.meta["models"]["teacher"]["scales"]}
    assert res.meta["models"]["student"]["num_params"] == n_S
    # per-leaf scales named in the notes, measured for user modules
    scale_notes = [n for n in res.notes if "per-leaf scales" in n]
    assert len(scale_notes) == 2 and "LayerNorm_0/scale" in scale_notes[0]


def test_scales_are_measured_from_the_initialiser_and_drawn_per_leaf():
    """A linen Dense: its kernel's lecun-normal scale 1/sqrt(fan_in) is measured; its
    zero bias gets bias_scale. The engine draws N(0, (s_init s_leaf)^2) per leaf."""
    prep = models.prepare(nn.Dense(40), role="teacher_model", input_shape=(25,), out=40,
                          dtype="float32", bias_scale=0.3)
    scale = dict(zip(models.protocol.leaf_paths(prep.structure), prep.scales))
    assert scale["bias"] == 0.3
    # 4 draws x 1000 entries of a (truncated, variance-corrected) normal of sd 1/5
    rel_sd = 1 / math.sqrt(2 * 4 * 1000)
    assert abs(scale["kernel"] / 0.2 - 1) < 4 * rel_sd * 1.2
    P, s_init = 200, 0.7
    state, _ = populations._model_init(
        streams.root_key(1), jnp.arange(1, dtype=jnp.uint32), jnp.arange(P, dtype=jnp.uint32),
        jnp.float32(s_init), prep.scale_tree(jnp.float32), structure=prep.structure,
        init_stream="student_init", noise_stream="student_noise", dtype="float32")
    for name, leaf in state.position.items():
        v = np.asarray(leaf, np.float64).ravel()
        want = (s_init * scale[name]) ** 2
        # chi-square on the sum of squares (mean zero): z-score of the variance ratio
        z = (np.mean(v * v) / want - 1) / math.sqrt(2 / v.size)
        assert abs(z) < bonferroni_z(2), (name, z)


def test_given_scales_are_used_and_checked():
    tree = {"bias": 2.0, "kernel": 0.5}
    prep = models.prepare(kdsim.from_linen(nn.Dense(2), (3,), scales=tree), role="student_model",
                          input_shape=(3,), out=2, dtype="float32")
    assert prep.scales == (2.0, 0.5) and prep.scale_source == "given"
    with pytest.raises(kdsim.ModelError, match="finite number > 0"):
        models.prepare(kdsim.from_linen(nn.Dense(2), (3,), scales={"bias": 0.0, "kernel": 1.0}),
                       role="student_model", input_shape=(3,), out=2, dtype="float32")
    with pytest.raises(kdsim.ModelError, match="tree structure"):
        models.prepare(kdsim.from_linen(nn.Dense(2), (3,), scales={"kernel": 1.0}),
                       role="student_model", input_shape=(3,), out=2, dtype="float32")


def test_girsanov_on_a_user_model_pair():
    """The same plain-function model as teacher and student: Girsanov applies and every
    student carries a positive path-space sum; with alpha = 1 and the teacher's gamma the
    two drifts coincide and the sum vanishes (to float32 rounding of the cotangents)."""
    model = _pair_model()
    run = kdsim.run_populations({**CLS, "estimators": {"scratch": False}}, teacher_model=model,
                                student_model=model)
    assert run.resolved.girsanov and np.all(run.populations.girsanov > 0)
    assert run.models[0].num_params == D * 5 + 5 + 5 * K
    same = kdsim.run_populations({**CLS, "student": {"alpha": 1.0}, "estimators": {"scratch": False}},
                                 teacher_model=model, student_model=model)
    assert np.max(same.populations.girsanov) < 1e-9 * np.min(run.populations.girsanov)


def test_girsanov_between_different_structures_is_refused_before_training(monkeypatch):
    called = []
    monkeypatch.setattr(populations, "run_model", lambda *a, **k: called.append(1))
    with pytest.raises(kdsim.ConfigError, match=r"estimators.girsanov = true does not apply: the "
                       r"student's parameter structure differs .*teacher ResCNN: \d+ parameters"):
        kdsim.simulate({**CLS, "estimators": {"girsanov": True}}, teacher_model=ResCNN(),
                       student_model=_pair_model())
    assert not called


@pytest.mark.parametrize("bad,match", [
    (lambda: _pair_model(out=K + 1), r"maps inputs \(m, 6\) to \(2, 4\) with m = 2; the task needs "
                                     r"\(m, 3\) \(3 class logits\)"),
    (lambda: kdsim.Model(lambda k: {"w": jnp.zeros((7, K))}, lambda p, x: x @ p["w"]),
     r"student_model \(.*\) fails on the task's inputs of shape \(m, 6\)"),
    (lambda: kdsim.Model(lambda k: {"w": jnp.zeros((D, K), jnp.int32)}, lambda p, x: x @ p["w"]),
     r"parameter w has dtype int32"),
    (lambda: object(), r"must be a kdsim.Model\(init, apply\), a flax linen module"),
])
def test_models_that_do_not_fit_the_task_get_one_clear_error(bad, match, monkeypatch):
    called = []
    monkeypatch.setattr(populations, "run_model", lambda *a, **k: called.append(1))
    with pytest.raises(kdsim.ConfigError, match=match):
        kdsim.simulate(CLS, student_model=bad())
    assert not called


def test_linear_task_takes_no_model():
    with pytest.raises(kdsim.ConfigError, match="linear_gaussian has its own linear model"):
        kdsim.simulate({"num_particles": 4}, teacher_model=_pair_model())


def test_autodiff_energy_gradient_matches_finite_differences():
    """The engine's teacher and student gradients (built-in CNN, float64) against central
    finite differences of the SPEC §2 energies along random directions."""
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


def test_builtin_cnn_is_an_ntk_convnet_on_sequences_and_images():
    cfg = kdsim.ModelConfig(kind="cnn", channels=2, kernel_size=3, depth=1, activation="relu")
    seq = models.builtin(cfg, 2, (7,))
    prep = models.prepare(seq, role="teacher_model", input_shape=(7,), out=2, dtype="float32")
    w = langevin.gaussian_like(jax.random.key(0), prep.structure.zeros(jnp.float32))
    x = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32)
    conv, dense = w["NTKConv_0"], w["NTKDense_0"]
    kern = np.asarray(conv["Conv_0"]["kernel"])                       # (3, 1, 2)
    padded = np.pad(x, ((0, 0), (1, 1)))
    pre = np.stack([sum(padded[:, j + t, None] * kern[t, 0][None] for t in range(3))
                    for j in range(7)], 1) / np.sqrt(3) + np.asarray(conv["bias"])
    pooled = np.maximum(pre, 0).mean(1)
    want = pooled @ np.asarray(dense["kernel"]) / np.sqrt(2) + np.asarray(dense["bias"])
    np.testing.assert_allclose(np.asarray(seq.apply(w, x)), want, rtol=1e-5, atol=1e-6)
    img = models.prepare(models.builtin(cfg, 10, (8, 8, 1)), role="teacher_model",
                         input_shape=(8, 8, 1), out=10, dtype="float32")
    assert img.structure.num_params == 3 * 3 * 1 * 2 + 2 + 2 * 10 + 10


def test_builtin_cnn_teacher_in_a_planted_task():
    cfg = {**CLS, "teacher": {"num_steps": 20, "model": {"kind": "cnn", "channels": 4}},
           "estimators": {"scratch": False}}
    run = kdsim.run_populations(cfg)
    assert run.models[0].name == "built-in cnn" and run.models[1].name == "built-in mlp"
    assert not run.resolved.girsanov and "parameter structure differs" in run.resolved.girsanov_reason
    kernel = run.populations.teacher["NTKConv_0"]["Conv_0"]["kernel"]
    assert kernel.shape == (2, 8, 3, 1, 4) and np.all(np.isfinite(kernel))


@pytest.mark.parametrize("schedule", ["polynomial", "cosine"])
def test_linear_closed_forms_follow_the_schedule(schedule):
    """Under a schedule the finite-time laws iterate the engine's h_t: the teacher
    population's per-coordinate means and variances match them by z-score, and differ
    from the constant-step laws by many standard errors."""
    over = {"teacher.schedule": schedule, "teacher.schedule_offset": 5.0, "teacher.num_steps": 60,
            "teacher.step_size": 0.02, "task.d": 3, "task.k": 1, "task.n": 16, "num_datasets": 2,
            "num_particles": 2000}
    cfg = SimConfig.from_dict({}).replace(over)
    run = kdsim.run_populations(cfg)
    res = resolve(cfg)
    laws = closed_form.finite_time(run.data, res.static, res.numeric)
    const = closed_form.finite_time(run.data, resolve(cfg.replace({"teacher.schedule": "constant"})).static,
                                    res.numeric)
    W = run.populations.teacher.astype(np.float64)[:, :, 0]            # (E, P, d)
    P = W.shape[1]
    m, v = W.mean(1), W.var(1, ddof=1)
    sd_m = np.sqrt(np.diagonal(laws.Sigma_T, axis1=1, axis2=2) / P)
    var = np.diagonal(laws.Sigma_T, axis1=1, axis2=2)
    z = np.concatenate([((m - laws.M_T[:, 0]) / sd_m).ravel(), ((v - var) / (var * np.sqrt(2 / (P - 1)))).ravel()])
    assert np.max(np.abs(z)) < bonferroni_z(z.size)
    # the schedule matters: the constant-step law is far off, by the same yardstick
    z_const = ((v - np.diagonal(const.Sigma_T, axis1=1, axis2=2)) / (var * np.sqrt(2 / (P - 1)))).ravel()
    assert np.max(np.abs(z_const)) > 3 * bonferroni_z(z.size)


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


def test_sweep_passes_user_models_and_keys_points_by_them(tmp_path):
    model = _pair_model()
    base = {**CLS, "teacher": {"num_steps": 10}, "estimators": {"scratch": False}}
    table = kdsim.sweep(base, {"student.alpha": [0.2]}, out=tmp_path / "s", teacher_model=model,
                        student_model=model)
    assert np.all(np.isfinite(table["kl_girsanov"]))
    with pytest.raises(kdsim.SweepError, match="models differ"):
        kdsim.sweep(base, {"student.alpha": [0.2]}, out=tmp_path / "s", teacher_model=_pair_model(6),
                    student_model=model)
