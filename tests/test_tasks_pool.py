"""Pool tasks (SPEC §9 "Data"): datasets are i.i.d. pool draws, the population risk is the
exact pool average, bad pools get one clear error, and everything downstream runs on
real data (digits: a CNN teacher distilled into an MLP student)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdsim
from kdsim import streams
from kdsim.config import ConfigError
from kdsim.evaluation import particle_metrics
from kdsim.tasks import pool as pool_task
from kdsim.tasks import sources

sweep_mod = importlib.import_module("kdsim.sweep")   # kdsim.sweep is the function

TINY = {"num_datasets": 2, "num_particles": 8,
        "teacher": {"num_steps": 20, "step_size": 1e-3},
        "estimators": {"power_iterations": 3, "hutchinson_probes": 2, "channel_draws": 2}}


def _cfg(**task):
    return {**TINY, "task": {"name": "pool", "source": "arrays", "n": 16, **task}}


def _user_pool(N=40, shape=(5,), K=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N,) + shape).astype(np.float32), rng.integers(0, K, N)


# ------------------------------------------------------------------ sampling

def _distinct_law(N: int, n: int) -> tuple[float, float]:
    """Mean and variance of the number of distinct indices among n uniform draws from N
    (indicator sums: P(i seen) = 1 - q1, P(i and j seen) = 1 - 2 q1 + q2)."""
    q1, q2 = (1 - 1 / N) ** n, (1 - 2 / N) ** n
    mean = N * (1 - q1)
    var = N * (1 - q1) * q1 + N * (N - 1) * ((1 - 2 * q1 + q2) - (1 - q1) ** 2)
    return mean, var


def test_datasets_are_iid_uniform_pool_draws():
    N, n, E = 50, 30, 400
    X = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    pool = sources.validate(X, np.arange(N) % 3, classification=True)
    root = streams.root_key(7)
    data = pool_task.make_data(root, np.arange(E), pool, n=n)
    assert data.index.shape == (E, n) and data.index.min() >= 0 and data.index.max() < N
    np.testing.assert_array_equal(data.X, X[data.index])
    np.testing.assert_array_equal(data.Y, pool.Y[data.index])
    # duplicates within a dataset as sampling with replacement predicts (z-score over the
    # datasets, and their spread equals the predicted one: no inflated standard error)
    distinct = np.array([len(np.unique(row)) for row in data.index])
    mean, var = _distinct_law(N, n)
    z = (distinct.mean() - mean) / np.sqrt(var / E)
    assert abs(z) < 4, (distinct.mean(), mean, z)
    ratio = distinct.std(ddof=1) / np.sqrt(var)
    assert 0.8 < ratio < 1.25, ratio
    # every pool point equally likely: chi-square of the index counts, N - 1 dof
    counts = np.bincount(data.index.ravel(), minlength=N)
    expected = E * n / N
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert abs(chi2 - (N - 1)) < 4 * np.sqrt(2 * (N - 1)), chi2
    # a dataset depends on its own key only, not on which datasets run with it
    part = pool_task.make_data(root, np.array([5, 123]), pool, n=n)
    np.testing.assert_array_equal(part.index, data.index[[5, 123]])
    # without replacement: no duplicates, still uniform marginals
    wo = pool_task.make_data(root, np.arange(E), pool, n=n, sampling="without_replacement")
    assert all(len(np.unique(row)) == n for row in wo.index)
    counts = np.bincount(wo.index.ravel(), minlength=N)
    chi2 = np.sum((counts - expected) ** 2 / expected) * (N - 1) / (N - n)   # finite-population
    assert abs(chi2 - (N - 1)) < 4 * np.sqrt(2 * (N - 1)), chi2


# ------------------------------------------------------------------ exact population risk

def _numpy_mlp(params, X: np.ndarray, depth: int) -> np.ndarray:
    """The built-in NTK MLP written in NumPy (float64): tanh hidden layers, flat inputs."""
    h = X.reshape(len(X), -1).astype(np.float64)
    for i in range(depth + 1):
        W = np.asarray(params[f"NTKDense_{i}"]["kernel"], np.float64)
        b = np.asarray(params[f"NTKDense_{i}"]["bias"], np.float64)
        h = h @ W / np.sqrt(W.shape[0]) + b
        if i < depth:
            h = np.tanh(h)
    return h


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_pool_risk_is_the_exact_pool_average(kind):
    # N = 2500 spans three blocks of 1024 (the last one padded); fixed random particles
    # of the built-in MLP, E = 2 datasets x P = 3 particles
    N, K, E, P, n = 2500, 4, 2, 3, 16
    cls = kind == "classification"
    rng = np.random.default_rng(3)
    X = rng.normal(size=(N, 3, 2)).astype(np.float32)
    Y = rng.integers(0, K, N) if cls else rng.normal(size=(N, 2))
    pool = sources.validate(X, Y, classification=cls)
    data = pool_task.make_data(streams.root_key(0), np.arange(E), pool, n=n)
    raw = kdsim.models.builtin(kdsim.ModelConfig(width=5), pool.out, pool.input_shape, "float32")
    model = kdsim.models.prepare(raw, role="teacher_model", input_shape=pool.input_shape,
                                 out=pool.out, dtype="float32")
    leaves, tree = jax.tree_util.tree_flatten(raw.init(jax.random.key(1)))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(k, (E, P) + a.shape) for k, a in zip(keys, leaves)])
    metrics = lambda block: particle_metrics(
        params, jnp.asarray(data.X), jnp.asarray(data.Y), pool_task.blocks(pool, jnp.float32, block),
        None, apply=model.apply, classification=cls)
    got = metrics(pool_task.BLOCK)
    Yp = pool.Y
    for e in range(E):
        for p in range(P):
            w = jax.tree_util.tree_map(lambda a: np.asarray(a[e, p]), params)
            f = _numpy_mlp(w, X, depth=1)                       # (N, out), all pool points at once
            if cls:
                logz = np.log(np.sum(np.exp(f - f.max(1, keepdims=True)), 1)) + f.max(1)
                ce = np.mean(logz - f[np.arange(N), Yp])
                err = np.mean(np.argmax(f, 1) != Yp)
                np.testing.assert_allclose(got["test"][e, p], ce, rtol=2e-5)
                np.testing.assert_allclose(got["test_01"][e, p], err, atol=1e-6)
                assert 0.3 < err < 1.0         # a random particle: the check is not vacuous
            else:
                sq = np.mean(0.5 * np.sum((Yp - f) ** 2, 1))
                np.testing.assert_allclose(got["test"][e, p], sq, rtol=2e-5)
            # the training risk is on the dataset's own points
            f_tr = _numpy_mlp(w, data.X[e], depth=1)
            tr = (np.mean(np.log(np.sum(np.exp(f_tr), 1)) - f_tr[np.arange(n), data.Y[e]]) if cls
                  else np.mean(0.5 * np.sum((data.Y[e] - f_tr) ** 2, 1)))
            np.testing.assert_allclose(got["train"][e, p], tr, rtol=2e-5)
    # the risk does not depend on the block size (one block = the plain mean)
    np.testing.assert_allclose(metrics(N)["test"], got["test"], rtol=2e-5)


# ------------------------------------------------------------------ bad pools

def _bad(match, data, error=kdsim.DataError, **task):
    with pytest.raises(error, match=match):
        kdsim.simulate(_cfg(**task), data=data, progress=False)


def test_every_bad_pool_gets_its_error():
    X, Y = _user_pool()
    assert issubclass(kdsim.DataError, ConfigError)
    Xn = X.copy()
    Xn[3, 1] = np.nan
    _bad("X holds 1 NaN or infinite values", (Xn, Y))
    Yr = np.random.default_rng(1).normal(size=(len(X), 2))
    Yr[0, 0] = np.inf
    _bad("Y holds 1 NaN or infinite values", (X, Yr), kind="regression")
    _bad("labels Y hold NaN", (X, np.where(np.arange(len(X)) == 2, np.nan, 1.0)))
    _bad("at least 2 points, got 1", (X[:1], Y[:1]))
    _bad("classification labels Y must be integers", (X, Y.astype(np.float64)))
    _bad(r"labels Y must be in \[0, K\), got the label -1", (X, np.where(Y == 0, -1, Y)))
    _bad("at least 2 classes", (X, np.zeros(len(X), np.int64)))
    _bad("same length .* 40 inputs and 39 labels", (X, Y[:-1]))
    _bad("task.n = 41 is larger than the pool \\(N = 40 points\\)", (X, Y), n=41,
         sampling="without_replacement")
    _bad("needs the pool", None)
    with pytest.raises(ConfigError, match="data=\\(X, Y\\) needs task.name = 'pool'"):
        kdsim.simulate({**TINY, "task": {"name": "mlp_regression"}}, data=(X, Y))
    with pytest.raises(kdsim.DataError, match="task.source = 'digits'"):
        kdsim.simulate({**TINY, "task": {"name": "pool"}}, data=(X, Y))
    # an input shape the model rejects: ModelError, before anything runs
    bad_model = kdsim.Model(lambda k: {"W": jnp.zeros((7, 3))}, lambda p, x: x @ p["W"])
    with pytest.raises(kdsim.ModelError, match="teacher_model \\(function\\) fails on the task's inputs of shape \\(m, 5\\)"):
        kdsim.simulate(_cfg(), teacher_model=bad_model, data=(X, Y))
    # config fields
    with pytest.raises(ConfigError, match="task.classes must be a list of at least 2 distinct"):
        kdsim.SimConfig.from_dict({"task": {"name": "pool", "classes": [4, 4]}})
    with pytest.raises(ConfigError, match="task.classes must be"):
        kdsim.SimConfig.from_dict({"task": {"name": "pool", "classes": [1.5, 2]}})
    with pytest.raises(ConfigError, match="task.sampling must be one of 'iid', 'without_replacement'"):
        kdsim.SimConfig.from_dict({"task": {"name": "pool", "sampling": "bootstrap"}})
    with pytest.raises(ConfigError, match="task.kind must be 'classification' for the built-in pool"):
        kdsim.SimConfig.from_dict({"task": {"name": "pool", "kind": "regression"}})
    _bad("the pool has no points with label\\(s\\) \\[7\\]", (X, Y), classes=[0, 7])


# ------------------------------------------------------------------ downstream on digits

@pytest.fixture(scope="module")
def digits_run():
    cfg = {**TINY, "task": {"name": "pool", "source": "digits", "n": 32},
           "teacher": {"num_steps": 20, "step_size": 2e-3, "model": {"kind": "cnn", "channels": 2}},
           "student": {"alpha": 0.5, "model": {"kind": "mlp", "width": 8}}}
    return kdsim.simulate(cfg, progress=False)


def test_digits_cnn_to_mlp_gives_finite_gaps_and_bounds(digits_run):
    res = digits_run
    df = res.per_dataset
    for col in ("gen_T", "gen_S", "gen_T_01", "gen_S_01", "gen_S_scratch", "gen_S_scratch_01",
                "test_loss_T", "test_loss_S", "gen_S_F", "F_B0_upper", "F_B1_upper",
                "sharpness_top", "sharpness_trace", "klF_convexity"):
        assert np.isfinite(df[col]).all(), col
    assert (df["test_loss_T_01"] > 0).all() and (df["test_loss_T_01"] < 1).all()
    X, Y, idx = res.datasets["X"], res.datasets["Y"], res.datasets["index"]
    assert X.shape == (2, 32, 8, 8, 1) and Y.shape == (2, 32) and idx.shape == (2, 32)
    pool = sources.load(res.config.task)
    np.testing.assert_array_equal(X, pool.X[idx])
    np.testing.assert_array_equal(Y, pool.Y[idx])
    assert any("pool: digits, N = 1797 points of shape (8, 8, 1), 10 classes" in n for n in res.notes)
    assert res.meta["pool"]["sha256"] == pool.digest


def test_pool_result_round_trips(digits_run, tmp_path):
    digits_run.save(tmp_path / "r")
    back = kdsim.load_result(tmp_path / "r")
    assert back.config == digits_run.config
    for k in ("X", "Y", "index"):
        np.testing.assert_array_equal(back.datasets[k], digits_run.datasets[k])
    assert back.datasets["index"].dtype == np.int64
    import pandas as pd
    pd.testing.assert_frame_equal(back.per_dataset, digits_run.per_dataset)
    digits_run.plot(str(tmp_path / "overview.png"))
    assert (tmp_path / "overview.png").stat().st_size > 10_000


# ------------------------------------------------------------------ sweeps: the pool is part of a point

def test_sweep_on_a_user_pool_same_structure_girsanov_and_no_mixing(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    XA = rng.normal(size=(30, 4)).astype(np.float32)
    YA = (XA[:, :2] + 0.1 * rng.normal(size=(30, 2))).astype(np.float32)
    XB, YB = XA.copy(), YA.copy()
    YB[0, 0] += 1.0                             # one label differs
    cfg = kdsim.SimConfig.from_dict({**_cfg(kind="regression"),
                                     "student": {"alpha": 0.5, "model": {"width": 64}}})
    out = tmp_path / "sw"
    table = kdsim.sweep(cfg, {"seed": [0]}, out=out, data=(XA, YA))
    # same structure: Girsanov and the parameter-space bounds exist on the pool
    assert np.isfinite(table["kl_girsanov"]).all() and np.isfinite(table["B0_upper"]).all()
    assert np.isfinite(table["gen_S"]).all() and np.isfinite(table["F_B0_upper"]).all()
    hA = sweep_mod.point_hash(cfg, {"data": (XA, YA)})
    hB = sweep_mod.point_hash(cfg, {"data": (XB, YB)})
    assert hA != hB and hA == sweep_mod.point_hash(cfg, {"data": (jnp.asarray(XA), jnp.asarray(YA))})
    # resuming the store with another pool is refused; with the same pool nothing reruns
    with pytest.raises(kdsim.SweepError, match="pool or models differ"):
        kdsim.sweep(cfg, {"seed": [0]}, out=out, data=(XB, YB))
    calls = []
    monkeypatch.setattr(sweep_mod, "simulate", lambda *a, **k: calls.append(1))
    again = kdsim.sweep(cfg, {"seed": [0]}, out=out, data=(XA, YA))
    assert calls == []
    np.testing.assert_array_equal(again["gen_S"], table["gen_S"])
    folder = sweep_mod._point_dir(str(out), 0, hA)
    assert sweep_mod.load_point(folder, hB) is None        # a foreign pool's point never loads
