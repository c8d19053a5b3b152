"""Neural tasks (SPEC §2, §5, §6): data, NTK models, distillation objectives, engine,
Girsanov, sharpness, bounds, KD versus scratch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kdsim
from kdsim import evaluation, langevin, models, populations, streams
from kdsim.config import LangevinNumeric, SimConfig, resolve
from kdsim.estimators import sharpness
from kdsim.stats import bonferroni_z
from kdsim.tasks import mlp as mlp_task

SMALL = {"task": {"d": 4, "n": 32, "n_test": 512, "k": 2}, "teacher": {"num_steps": 80,
         "model": {"width": 8}}, "student": {"model": {"width": 8}, "alpha": 0.3},
         "num_datasets": 3, "num_particles": 16}


def _cfg(task, **over):
    base = {**SMALL, "task": {**SMALL["task"], "name": task}}
    return SimConfig.from_dict(base).replace(over) if over else SimConfig.from_dict(base)


@pytest.fixture(scope="module", params=["mlp_regression", "mlp_classification"])
def result(request):
    return kdsim.simulate(_cfg(request.param))


# ---------------------------------------------------------------------------------- data


def test_planted_network_and_classification_labels():
    root = streams.root_key(3)
    data = mlp_task.make_data(root, np.arange(2), n=4000, d=5, out=3, n_test=10, planted_width=16,
                              planted_scale=2.0, noise=0.5, classification=True)
    x = data.X[0]
    f = 2.0 * np.tanh(x @ data.B.T / np.sqrt(5)) @ data.A.T / np.sqrt(16)
    np.testing.assert_allclose(np.asarray(mlp_task.planted_function(jnp.asarray(x), jnp.asarray(data.A),
                                                                    jnp.asarray(data.B), 2.0)), f, rtol=1e-5, atol=1e-5)
    # y ~ Cat(softmax(f*)): class frequencies against the mean probabilities, by z-score
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[data.Y[0]]
    z = (onehot.mean(0) - p.mean(0)) / np.sqrt((p * (1 - p)).mean(0) / 4000)
    assert np.max(np.abs(z)) < bonferroni_z(3)
    assert abs(x.std() - 1.0) < 0.05
    reg = mlp_task.make_data(root, np.arange(1), n=4000, d=5, out=2, n_test=10, planted_width=16,
                             planted_scale=2.0, noise=0.5, classification=False)
    f2 = 2.0 * np.tanh(reg.X[0] @ reg.B.T / np.sqrt(5)) @ reg.A[:2].T / np.sqrt(16)
    resid = reg.Y[0] - f2                          # the NumPy planted function, not kdsim's
    # y = f* + 0.5 eps: residual sd 0.5 within 4 of its standard errors (0.5 / sqrt(2 * 8000))
    assert abs(resid.std() - 0.5) < 4 * 0.5 / np.sqrt(2 * resid.size)
    assert abs(resid.mean()) < 4 * 0.5 / np.sqrt(resid.size)


def _prepared(width=6, depth=2, out=3, d=5, kind="mlp"):
    cfg = kdsim.ModelConfig(kind=kind, width=width, depth=depth, activation="tanh")
    model = models.builtin(cfg, out, (d,))
    return model, models.prepare(model, role="teacher_model", input_shape=(d,), out=out,
                                 dtype="float32")


def _draws(prepared, P, init_scale=0.7, stream="teacher_init"):
    """Initial particles of one dataset, as the engine draws them (leaves ``(P, ...)``)."""
    state, _ = populations._model_init(
        streams.root_key(0), jnp.arange(1, dtype=jnp.uint32), jnp.arange(P, dtype=jnp.uint32),
        jnp.float32(init_scale), prepared.scale_tree(jnp.float32), structure=prepared.structure,
        init_stream=stream, noise_stream="teacher_noise", dtype="float32")
    return jax.tree_util.tree_map(lambda x: x[0], state.position)


def test_ntk_layers_and_initial_law():
    model, prep = _prepared()
    assert prep.num_params == 5 * 6 + 6 + 6 * 6 + 6 + 6 * 3 + 3
    assert prep.scales == (1.0,) * 6 and prep.scale_source == models.UNIT
    draws = _draws(prep, 400)
    params = jax.tree_util.tree_map(lambda x: x[0], draws)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    h = x
    for name in ("NTKDense_0", "NTKDense_1"):
        layer = params[name]
        h = np.tanh(h @ np.asarray(layer["kernel"]) / np.sqrt(h.shape[1]) + np.asarray(layer["bias"]))
    last = params["NTKDense_2"]
    out = h @ np.asarray(last["kernel"]) / np.sqrt(6) + np.asarray(last["bias"])
    np.testing.assert_allclose(np.asarray(model.apply(params, x)), out, rtol=1e-5, atol=1e-6)
    # every parameter N(0, s_init^2): pooled over many draws
    v = np.asarray(ravel_pytree(draws)[0])
    assert abs(v.mean()) < 4 * 0.7 / np.sqrt(v.size)
    assert abs(v.var() / 0.49 - 1) < 4 * np.sqrt(2 / v.size)


# ---------------------------------------------------------------------- objectives, engine


@pytest.mark.parametrize("classification", [False, True])
def test_student_energy_gradient_matches_the_spec_energy(classification):
    """The engine's autodiff gradients (one vjp, two cotangents) against ``jax.grad`` of
    the SPEC energies written out here, with per-leaf prior scales that differ by leaf."""
    model, prep = _prepared(width=5, depth=1, out=3, d=4)
    both = _draws(prep, 2, init_scale=1.0)
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
    cfg = _cfg("mlp_regression", **{"teacher.num_steps": 5, "num_particles": 3, "num_datasets": 2})
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


# ------------------------------------------------------------------------------- results


def test_columns_per_loss_and_scratch_columns(result):
    df = result.per_dataset
    # no healthy chain is ever flagged diverged (the flags are sticky): the escape test
    # of kdsim.langevin leaves these runs alone
    for col in ("diverged_T", "diverged_S", "diverged_scratch"):
        assert (df[col] == 0).all(), col
    cls = result.config.task.name == "mlp_classification"
    for col in ["gen_T", "gen_S", "gen_T_se", "gen_S_se", "klpred_convexity", "sharpness_top",
                "sharpness_trace", "sharpness_sam", "gap_gradient", "gap_curvature", "rho",
                "kl_girsanov", "gen_S_scratch", "test_loss_T", "test_loss_S", "test_loss_S_scratch",
                "B0_upper", "B1_upper", "B2_lower", "B3_upper"]:
        assert col in df, col
    for col in ["gen_S", "test_loss_S", "gen_S_scratch", "klpred_convexity", "kl_girsanov"]:
        assert np.all(np.isfinite(df[col])), col
    if cls:
        for col in ["gen_T_01", "gen_S_01", "B1_upper_01", "B3_upper_01", "test_loss_S_scratch_01"]:
            assert col in df, col
        assert np.all(np.isnan(df["B3_upper_01"]))
        assert any(n.startswith("B3_upper_01: NaN: B3 is never computed from the 0-1 loss") for n in result.notes)
        assert np.all((df["test_loss_S_01"] >= 0) & (df["test_loss_S_01"] <= 1))
    assert "scratch" in result.meta["phase_seconds"]
    # same architecture, same steps, step size and init: Girsanov applies, the bounds exist
    assert np.all(np.isfinite(df["B0_upper"])) and np.all(np.isfinite(df["B1_upper"]))


def _numpy_forward(params, x, activation=np.tanh):
    """The NTK MLP written out: ``h <- act(h K / sqrt(fan_in) + b)``, the last layer linear.
    params: one particle's ``{layer_i: {"kernel", "bias"}}`` (layers in index order)."""
    layers = sorted(params, key=lambda name: int(name.rsplit("_", 1)[-1]))
    h = x
    for i, name in enumerate(layers):
        K, b = np.asarray(params[name]["kernel"], np.float64), np.asarray(params[name]["bias"], np.float64)
        h = h @ K / np.sqrt(K.shape[0]) + b
        if i < len(layers) - 1:
            h = activation(h)
    return h


@pytest.fixture(scope="module")
def direct(result):
    """Per-point losses, averaged over each population's particles, evaluated here with the
    NumPy network on 4000 fresh points per dataset and on the training data:
    ``{who: (fresh (E, 4000), train (E,))}`` for T, S and the scratch student."""
    cfg = result.config
    cls = cfg.task.name == "mlp_classification"
    run = kdsim.run_populations(cfg)
    pops = run.populations
    assert not (pops.diverged_T.any() or pops.diverged_S.any() or pops.diverged_scratch.any())
    A, B = result.datasets["planted_A"], result.datasets["planted_B"]
    rng = np.random.default_rng(11)
    E, P, m = cfg.num_datasets, cfg.num_particles, 4000

    def loss(f, y):                                    # (P, m, out), (m, ...) -> (P, m)
        if cls:
            f = f - f.max(-1, keepdims=True)
            return np.log(np.exp(f).sum(-1)) - np.take_along_axis(f, y[None, :, None], -1)[..., 0]
        return 0.5 * np.sum((y[None] - f) ** 2, -1)

    out = {who: (np.zeros((E, m)), np.zeros(E)) for who in ("T", "S", "S_scratch")}
    for e in range(E):
        x = rng.normal(size=(m, cfg.task.d))
        f_star = cfg.task.planted_scale * np.tanh(x @ B.T / np.sqrt(cfg.task.d)) @ A.T / np.sqrt(B.shape[0])
        if cls:
            p = np.exp(f_star - f_star.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            y = (rng.uniform(size=(m, 1)) > np.cumsum(p, 1)).sum(1)
        else:
            y = f_star[:, :cfg.task.k] + cfg.task.noise * rng.normal(size=(m, cfg.task.k))
        X_tr, Y_tr = result.datasets["X"][e], np.asarray(result.datasets["Y"][e])
        for who, tree in (("T", pops.teacher), ("S", pops.student), ("S_scratch", pops.scratch)):
            ws = [jax.tree_util.tree_map(lambda a: np.asarray(a[e, i]), tree) for i in range(P)]
            out[who][0][e] = loss(np.stack([_numpy_forward(w, x) for w in ws]), y).mean(0)
            out[who][1][e] = loss(np.stack([_numpy_forward(w, X_tr) for w in ws]), Y_tr).mean()
    return out


def test_test_losses_of_kd_and_scratch_students_match_a_direct_evaluation(result, direct):
    """test_loss_{T,S,S_scratch} and the gaps (gen_S_scratch among them) against the
    NumPy network on fresh data. Both use the same particles, so only the two test
    samples differ: z = difference / sqrt(v/4000 + v/n_test), v the spread over points."""
    df = result.per_dataset
    n_test = result.config.task.n_test
    z = []
    for who in ("T", "S", "S_scratch"):
        fresh, train = direct[who]
        se = fresh.std(1, ddof=1) * np.sqrt(1 / fresh.shape[1] + 1 / n_test)
        z.append((df[f"test_loss_{who}"] - fresh.mean(1)) / se)
        # the gap's training part is exact on both sides (float32 engine: 1e-5 relative)
        np.testing.assert_allclose(df[f"test_loss_{who}"] - df[f"gen_{who}"], train, rtol=1e-5,
                                   atol=1e-6, err_msg=who)
    z = np.concatenate(z)
    assert np.max(np.abs(z)) < bonferroni_z(z.size), z
    # the difference is real test-sample noise (the statistic is not degenerate)
    assert np.any(np.abs(z) > 0.1)


def test_bounds_hold_where_assumptions_hold(result, direct):
    """Each bound against the student's true gap, estimated here on fresh data with its
    error (plus gen_T's, the bound's own Monte Carlo error); B0 assumes nothing."""
    df = result.per_dataset
    fresh, train = direct["S"]
    truth = fresh.mean(1) - train
    slack = 3 * np.sqrt(fresh.var(1, ddof=1) * (1 / fresh.shape[1] + 1 / result.config.task.n_test)
                        + df["gen_T_se"] ** 2)
    checked = 0
    for b in ["B0_upper", "B0_lower", "B1_upper", "B2_lower", "B3_upper"]:
        held = np.ones(len(df), bool) if b.startswith("B0") else \
            df[f"{b}_assumption"].to_numpy(dtype=bool, na_value=False)
        sign = 1.0 if b.endswith("upper") else -1.0
        holds = sign * (df[b] - truth) >= -slack
        assert holds[held].all(), (b, df.loc[held & ~holds])
        checked += held.sum()
    assert checked >= 2 * len(df)
    assert np.all(df["B0_upper"] <= df["B1_upper"] + 1e-9)
    if result.config.task.name == "mlp_classification":       # the 0-1 loss: MC truth
        t01, se01 = df["gen_S_01"], np.sqrt(df["gen_S_01_se"] ** 2 + df["gen_T_01_se"] ** 2)
        for b in ["B0_upper_01", "B1_upper_01"]:
            assert np.all(df[b] >= t01 - 3 * se01), b
        for b in ["B0_lower_01", "B2_lower_01"]:
            held = np.ones(len(df), bool) if b.startswith("B0") else \
                df[b.replace("_01", "_assumption_01")].to_numpy(dtype=bool, na_value=False)
            assert np.all((df[b] <= t01 + 3 * se01)[held]), b
        assert np.all(df["B0_upper_01"] <= df["B1_upper_01"] + 1e-9)


def test_zero_one_bound_with_bounded_sigma_is_never_below_the_truth():
    res = kdsim.simulate(_cfg("mlp_classification", **{"student.model.width": 4}))
    df = res.per_dataset
    # a narrower student: no parameter-space KL; the flags say so, nothing is made up
    assert np.all(np.isnan(df["B1_upper_01"]))
    assert any("Girsanov does not apply (the student's parameter structure differs" in n for n in res.notes)
    same = kdsim.simulate(_cfg("mlp_classification", **{"seed": 1}))
    d2 = same.per_dataset
    assert np.all(d2["sigma_B1_01"] == 1.0)
    assert d2["B1_upper_assumption_01"].to_numpy(dtype=bool).all()
    truth_hi = d2["gen_S_01"] - 3 * d2["gen_S_01_se"]
    assert np.all(d2["B1_upper_01"] >= truth_hi)


def test_scratch_can_be_switched_off():
    res = kdsim.simulate(_cfg("mlp_regression", **{"estimators.scratch": False}))
    assert np.all(np.isnan(res.per_dataset["gen_S_scratch"]))
    assert "scratch" not in res.meta["phase_seconds"]
    assert any(n.startswith("gen_S_scratch, test_loss_S_scratch: not computed") for n in res.notes)


def test_classification_convexity_is_student_first_kl_summed_over_points():
    cfg = _cfg("mlp_classification", **{"student.temperature": 2.0})
    run = kdsim.run_populations(cfg)
    tm, sm = run.models
    X = jnp.asarray(run.data.X)
    fT = np.asarray(jax.vmap(lambda w_e, x: jax.vmap(lambda w: tm.apply(w, x))(w_e))(
        run.populations.teacher, X), np.float64)
    fS = np.asarray(jax.vmap(lambda w_e, x: jax.vmap(lambda w: sm.apply(w, x))(w_e))(
        run.populations.student, X), np.float64)
    ctx, _, _ = evaluation.context(run)
    cols = evaluation.predictive_stage(ctx, evaluation.Produced({}, {})).columns
    lq = fS / 2 - np.log(np.exp(fS / 2).sum(-1, keepdims=True))
    lp = fT / 2 - np.log(np.exp(fT / 2).sum(-1, keepdims=True))
    direct = (np.exp(lq) * (lq - lp)).sum((-1, -2)).mean(1)
    np.testing.assert_allclose(cols["klpred_convexity"], direct, rtol=1e-4)


# -------------------------------------------------------------------- girsanov, sharpness


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


def test_girsanov_refuses_where_it_does_not_bound():
    for over, why in [({"student.rank": 2}, "rank-r student"),
                      ({"student.langevin.step_size": 1e-4}, "step size differs"),
                      ({"student.langevin.num_steps": 10}, "number of steps differs"),
                      ({"student.langevin.init_scale": 0.5}, "initial law differs")]:
        cfg = SimConfig.from_dict({"task": {"d": 3}}).replace(over)
        res = resolve(cfg)
        assert not res.girsanov and why in res.girsanov_reason
        with pytest.raises(kdsim.ConfigError, match="bound_divergence = 'girsanov' does not apply"):
            resolve(cfg.replace({"estimators.bound_divergence": "girsanov"}))


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


def test_laplace_is_nan_when_particles_do_not_exceed_dimension(result):
    assert np.all(np.isnan(result.per_dataset["sharpness_laplace_top"]))
    assert any("needs more particles (16) than parameters" in n for n in result.notes)


@pytest.mark.slow
def test_self_distillation_and_compression_run_at_the_issue_scale_shape():
    """Width-64 teacher with width-8 and width-64 students, 16 datasets x 64 particles
    (few steps here; the full-length run is the README's timing)."""
    for width in (8, 64):
        res = kdsim.simulate({"task": {"name": "mlp_regression", "n_test": 512},
                              "teacher": {"num_steps": 10}, "student": {"model": {"width": width}},
                              "num_datasets": 16, "num_particles": 64})
        assert len(res.per_dataset) == 16
        assert np.isfinite(res.per_dataset["gen_S"]).all()
        assert np.isfinite(res.per_dataset["kl_girsanov"]).all() == (width == 64)
    assert math.isfinite(res.summary.loc["gen_S", "mean"])
