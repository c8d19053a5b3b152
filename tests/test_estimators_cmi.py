"""CMI bounds of the supersample design (kdsim/estimators/cmi.py, kdsim/evaluation_cmi.py,
kdsim/tasks/supersample.py): plug-in MI against NumPy, data processing, the bounds on
the truth (computed here independently) across regimes, a broken design detected, and
the plug-in bias against M x P."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

import kdsim
from kdsim import evaluation_cmi as ec
from kdsim.estimators import cmi
from kdsim.simulate import run_populations
from kdsim.tasks import supersample as ss


def numpy_mi(x: np.ndarray, u: np.ndarray) -> float:
    """Plug-in MI (nats) of two discrete samples, written independently of kdsim."""
    n = len(x)
    mi = 0.0
    for a in np.unique(x):
        for b in np.unique(u):
            pab = np.sum((x == a) & (u == b)) / n
            if pab > 0:
                mi += pab * np.log(pab / (np.mean(x == a) * np.mean(u == b)))
    return mi


def test_plugin_mi_textbook_and_numpy():
    with jax.enable_x64(True):
        mi = lambda x, u, K: float(cmi.plugin_mi(jnp.asarray(x), jnp.asarray(u), K))
        u = np.repeat([0, 1], 50)
        assert mi(u, u, 2) == pytest.approx(np.log(2), abs=1e-12)          # X = U: H(U)
        assert mi(np.zeros(100, int), u, 3) == pytest.approx(0.0, abs=1e-12)
        # binary symmetric channel with exact proportions: log 2 - H_b(eps)
        eps = 0.2
        x = u.copy()
        x[:10] ^= 1
        x[50:60] ^= 1
        hb = -eps * np.log(eps) - (1 - eps) * np.log(1 - eps)
        assert mi(x, u, 2) == pytest.approx(np.log(2) - hb, abs=1e-12)
        rng = np.random.default_rng(0)
        for K in (3, 9):
            x = rng.integers(0, K, 500)
            u = (rng.random(500) < 0.5 + 0.05 * (x % 2)).astype(int)
            w = rng.random(500) < 0.8     # zero weights drop samples
            assert mi(x, u, K) == pytest.approx(numpy_mi(x, u), rel=1e-10)
            got = float(cmi.plugin_mi(jnp.asarray(x), jnp.asarray(u), K, jnp.asarray(w, float)))
            assert got == pytest.approx(numpy_mi(x[w], u[w]), rel=1e-10)


def test_binary_kl_inverses_against_scipy():
    d = lambda a, p: (a * np.log(a / p) if a > 0 else 0.0) + (
        (1 - a) * np.log((1 - a) / (1 - p)) if a < 1 else 0.0)
    with jax.enable_x64(True):
        for a, r in ((0.1, 0.05), (0.3, 0.2), (0.0, 0.1), (0.5, 0.01)):
            want = optimize.brentq(lambda p: d(a, p) - r, a, 1 - 1e-15)
            assert float(cmi.kl_inverse_upper(jnp.float64(a), jnp.float64(r))) == pytest.approx(want, abs=1e-12)
        for r in (0.01, 0.3):
            want = optimize.brentq(lambda x: d(x, 0.5) - r, 0.5, 1 - 1e-15)
            assert float(cmi.kl_inverse_first(jnp.float64(0.5), jnp.float64(r))) == pytest.approx(want, abs=1e-12)
        assert float(cmi.kl_inverse_first(jnp.float64(0.5), jnp.float64(0.7))) == 1.0   # r > log 2


def _memoriser(seed=0, S=4, M=16, P=8, n=16, K=3, rate=0.3):
    """A learner that copies the label of each training point with probability ``rate``
    and guesses otherwise: its expected gap (0-1 loss) is rate (1 - 1/K). The default
    shapes are the planted-classification run's below: one compiled program for both."""
    rng = np.random.default_rng(seed)
    U0 = rng.integers(0, 2, (S, M // 2, n))
    U = np.concatenate([U0, 1 - U0], axis=1)
    y = rng.integers(0, K, (S, n, 2))
    labels = rng.integers(0, K, (S, M, P, n, 2))
    memo = rng.random((S, M, P, n)) < rate
    for j in range(2):
        labels[..., j] = np.where((U[:, :, None, :] == j) & memo, y[:, None, None, :, j], labels[..., j])
    losses = (labels != y[:, None, None]).astype(np.float64)
    return U, labels, losses


def test_data_processing_and_bounds_above_the_heldout_gap():
    U, labels, losses = _memoriser()
    S, M, P, n, _ = losses.shape
    w = np.ones((S, M, P))
    with jax.enable_x64(True):
        q = cmi.round_losses(jnp.asarray(losses), jnp.zeros(losses.shape), 1.0, 1)
        codes = cmi.family_codes(q, 1, jnp.asarray(labels), 3)
        mi = {f: np.asarray(cmi.mutual_information(cmi.pair_counts(c, jnp.asarray(U), jnp.asarray(w), K)))
              for f, (c, K) in codes.items()}
        r = jax.device_get(cmi.cmi_bounds(jnp.asarray(U), jnp.asarray(w), jnp.asarray(losses),
                                          jnp.zeros(losses.shape), jnp.asarray(labels), 1.0,
                                          bins=1, num_classes=3))
    # per supersample and pair, on the same samples: ld <= e <= f (up to rounding)
    assert np.all(mi["ld"] <= mi["e"] + 1e-12) and np.all(mi["e"] <= mi["f"] + 1e-12)
    assert np.all(mi["f"] - mi["ld"] > 1e-3)          # and not trivially equal
    # one pair checked against the NumPy MI
    s, i = 1, 5
    x = labels[s, :, :, i, 0] * 3 + labels[s, :, :, i, 1]
    assert mi["f"][s, i] == pytest.approx(numpy_mi(x.ravel(), np.repeat(U[s, :, i], P)), rel=1e-10)
    # with complementary masks DV holds for the empirical law: every bound is above the
    # held-out gap of the same samples, and the square-root forms are ordered
    G = ((1 - 2 * U)[:, :, None, :] * (losses[..., 1] - losses[..., 0])).mean()
    assert float(r.heldout_gap) == pytest.approx(G, abs=1e-12)
    for name in ("fcmi", "ecmi", "ldcmi", "ecmi_kl", "ldcmi_kl", "ldcmi_fast"):
        assert float(getattr(r, name)) >= G - 1e-12, name
    assert float(r.ldcmi) <= float(r.ecmi) <= float(r.fcmi)
    # the tight forms are close to the expected gap 0.3 x 2/3 = 0.2 here
    assert 0.19 < float(r.ldcmi_kl) < 0.23 and float(r.ldcmi_kl) < float(r.ldcmi)


def test_interpolating_identity():
    # a perfect memoriser (training error 0): I(Delta; U) = P(held-out error) log 2
    U, labels, losses = _memoriser(seed=1, rate=1.0)
    S, M, P, n, _ = losses.shape
    with jax.enable_x64(True):
        r = jax.device_get(cmi.cmi_bounds(jnp.asarray(U), jnp.ones((S, M, P)), jnp.asarray(losses),
                                          jnp.zeros(losses.shape), jnp.asarray(labels), 1.0,
                                          bins=1, num_classes=3))
    assert float(r.interpolating) == 1.0 and float(r.train_loss) == 0.0
    # on the same samples the identity is exact up to the plug-in's own bias (~ 2/(2N))
    assert float(r.ldcmi_interp) == pytest.approx(float(r.heldout_gap), abs=0.01)
    assert float(r.heldout_gap) == pytest.approx(2 / 3, abs=0.02)


def test_plugin_bias_shrinks_with_samples():
    # codes independent of the masks: the plug-in MI is pure bias, about (K - 1) / (2 N);
    # N = M x P grows by keeping more of the 256 masks (weight 0 drops a run: one program)
    rng = np.random.default_rng(2)
    K, S, n, P, M = 9, 8, 64, 4, 256
    U0 = rng.integers(0, 2, (S, M // 2, n))
    U = np.concatenate([U0, 1 - U0], axis=1)
    means = []
    for kept in (16, 64, 256):
        half = np.arange(M // 2) < kept // 2       # complementary pairs stay together
        w = np.broadcast_to(np.concatenate([half, half])[None, :, None], (S, M, P)).astype(float)
        codes = rng.integers(0, K, (S, M, P, n))
        with jax.enable_x64(True):
            mi = np.asarray(cmi.mutual_information(cmi.pair_counts(
                jnp.asarray(codes), jnp.asarray(U), jnp.asarray(w), K)))
        N = kept * P
        means.append(mi.mean())
        # 512 pairs: the mean is within 15% of the Miller-Madow value
        assert mi.mean() == pytest.approx((K - 1) / (2 * N), rel=0.15), kept
    assert means[0] > 3 * means[1] > 9 * means[2]


# ---------------------------------------------------------------------------------------
# supersample runs: the bounds on an independently computed truth, across regimes

LINEAR = {"task.d": 4, "task.k": 1, "task.n": 16, "num_datasets": 6, "num_particles": 16,
          "teacher.num_steps": 200, "estimators.supersample": True, "estimators.masks": 16,
          "estimators.loss_clip": 1.0, "estimators.scratch": False, "seed": 3}


def exact_clipped_truth(run, B: float) -> np.ndarray:
    """Per dataset: the students' mean clipped gap, from the chi-square law of the k = 1
    residual ``y - w x ~ N(0, (w - w*) Sx (w - w*)^T + nu^2)`` (written here, not in kdsim):
    ``E min(r^2/2, B) = (s^2/2) F_3(2B/s^2) + B (1 - F_1(2B/s^2))``."""
    data, W = run.data, run.populations.student[:, :, 0, :]          # (E, P, d)
    delta = W - data.W_star[0]
    s2 = np.einsum("epd,d,epd->ep", delta, data.sx, delta) + data.noise**2
    t = 2 * B / s2
    pop = s2 / 2 * stats.chi2.cdf(t, 3) + B * stats.chi2.sf(t, 1)
    resid = data.Y[:, None, :, 0] - np.einsum("epd,end->epn", W, data.X)
    train = np.minimum(resid**2 / 2, B).mean(-1)
    return (pop - train).mean(1)


@pytest.fixture(scope="module")
def linear_runs():
    base = kdsim.SimConfig.from_dict(LINEAR)
    return [run_populations(base.replace(u), progress=False) for u in (
        {}, {"student.alpha": 0.6, "teacher.gamma": 200.0, "estimators.loss_clip": 0.5})]


def test_linear_supersample_design(linear_runs):
    run = linear_runs[0]
    st = run.resolved.static
    assert st.num_datasets == 6 * 16 and st.supersamples == 6 and st.masks == 16
    pr = ss.pairs_of(run)
    np.testing.assert_allclose(ss.take(pr.X, pr.U), run.data.X)      # D_U = the masked halves
    U = pr.U.reshape(6, 16, -1)
    np.testing.assert_array_equal(U[:, 8:], 1 - U[:, :8])               # complementary pairs
    assert 0.4 < U.mean() < 0.6
    # every mask of a supersample sees the same pairs; supersamples differ
    X = pr.X.reshape((6, 16) + pr.X.shape[1:])
    assert np.array_equal(X[:, 0], X[:, 5]) and not np.allclose(X[0, 0], X[1, 0])


def test_linear_bounds_hold_on_the_exact_truth(linear_runs):
    for run in linear_runs:
        B = run.config.estimators.loss_clip
        arrays = ec.student_arrays(run)
        df, notes = ec.cmi_rows(arrays)
        exact = exact_clipped_truth(run, B).reshape(6, 16).mean(1)       # per supersample
        truth, se = exact.mean(), exact.std(ddof=1) / np.sqrt(6)
        # kdsim's truth (fresh test points) agrees with the closed form: its error is the
        # test-point mean of a [0, B] variable, sd <= B/2, over n_test x E points
        tol = 4 * B / 2 / np.sqrt(run.resolved.static.n_test * 96)
        assert df.loc["ecmi_upper", "truth"] == pytest.approx(truth, abs=tol)
        assert set(df["family"]) == {"generic"} and set(df["loss"]) == {"clipped"}
        for name in ("ecmi_upper", "ldcmi_upper", "ldcmi_fast_upper", "ecmi_kl_upper",
                     "ldcmi_kl_upper"):
            assert df.loc[name, "value"] >= truth - 3 * se, (name, df.loc[name, "value"], truth)
            assert df.loc[name, "valid"] == 1.0
        assert df.loc["ldcmi_upper", "value"] <= df.loc["ecmi_upper", "value"]
        assert np.isnan(df.loc["fcmi_upper", "value"]) and np.isnan(df.loc["ldcmi_interpolating", "value"])
        assert df.loc["supersample_heldout_gap", "valid"] == 1.0
        assert any("plug-in bias" in n for n in notes) and any("f-CMI needs" in n for n in notes)


def test_dependent_masks_are_detected(linear_runs, monkeypatch):
    """A broken design: the mask trains on the point of each pair with the smaller |y|,
    the same for every mask (chosen by the data). The held-out halves are then not fresh
    draws: the check against the independent truth fails, and so do the bounds."""
    original = ss.linear_pairs

    def chosen_by_the_data(*args, **kwargs):
        pr = original(*args, **kwargs)
        return pr._replace(U=(np.abs(pr.Y[:, :, 1, 0]) < np.abs(pr.Y[:, :, 0, 0])).astype(np.int32))

    monkeypatch.setattr(ss, "linear_pairs", chosen_by_the_data)
    run = run_populations(linear_runs[0].config, progress=False)
    df, notes = ec.cmi_rows(ec.student_arrays(run))
    assert df.loc["supersample_heldout_gap", "valid"] == 0.0
    assert any("NOT independent of the data" in n for n in notes)
    assert df.loc["ldcmi_upper", "valid"] == 0.0 and df.loc["ecmi_upper", "valid"] == 0.0


CLASSIFICATION = {"task.name": "mlp_classification", "task.d": 4, "task.n": 16, "task.n_test": 512,
                  "num_datasets": 4, "num_particles": 8, "estimators.supersample": True,
                  "estimators.masks": 16, "teacher.model.width": 16, "student.model.width": 8,
                  "teacher.num_steps": 200, "teacher.step_size": 0.01, "estimators.scratch": False,
                  "student.alpha": 0.5, "seed": 1}


def test_classification_bounds_hold_on_the_truth():
    run = run_populations(CLASSIFICATION, progress=False)
    arrays = ec.student_arrays(run)
    df, notes = ec.cmi_rows(arrays)
    # the truth recomputed here: test 0-1 error (the run's test points) minus training error
    st = run.resolved.static
    apply = run.models[1].apply
    f_test = np.asarray(jax.vmap(lambda w_e, X_e: jax.vmap(apply, in_axes=(0, None))(w_e, X_e))(
        run.populations.student, run.data.X_test))
    test_err = (f_test.argmax(-1) != run.data.Y_test[:, None]).mean(-1)
    f_train = np.asarray(jax.vmap(lambda w_e, X_e: jax.vmap(apply, in_axes=(0, None))(w_e, X_e))(
        run.populations.student, run.data.X))
    train_err = (f_train.argmax(-1) != run.data.Y[:, None]).mean(-1)
    per_s = (test_err - train_err).mean(1).reshape(st.supersamples, st.masks).mean(1)
    truth, se = per_s.mean(), per_s.std(ddof=1) / np.sqrt(st.supersamples)
    assert df.loc["fcmi_upper", "truth"] == pytest.approx(truth, abs=1e-4)
    assert set(df["loss"]) == {"01"}
    for name in ("fcmi_upper", "ecmi_upper", "ldcmi_upper", "ldcmi_fast_upper", "ecmi_kl_upper",
                 "ldcmi_kl_upper"):
        assert df.loc[name, "value"] >= truth - 3 * se, name
    v = df["value"]
    assert v["ldcmi_upper"] <= v["ecmi_upper"] <= v["fcmi_upper"]
    assert v["ldcmi_kl_upper"] < v["ldcmi_upper"] < 1.0      # non-vacuous, the KL form tighter
    assert np.isnan(v["ldcmi_interpolating"]) and any("does not interpolate" in n for n in notes)
    assert df.loc["supersample_heldout_gap", "valid"] == 1.0


def test_config_fields():
    cfg = kdsim.SimConfig()
    assert cfg.estimators.supersample is False and cfg.estimators.masks == 32
    assert cfg.estimators.loss_clip is None
    for bad, field in (({"estimators.masks": 8}, "estimators.masks"),
                       ({"estimators.masks": 17}, "estimators.masks"),
                       ({"estimators.loss_clip": 0.0}, "estimators.loss_clip"),
                       ({"estimators.supersample": "yes"}, "estimators.supersample")):
        with pytest.raises(kdsim.ConfigError, match=field.replace(".", r"\.")):
            kdsim.SimConfig.from_dict(bad)


def test_simulate_hook(monkeypatch):
    """simulate() of a supersample run adds the columns and rows (the KD evaluation, the
    costly part and tested elsewhere, is replaced by its dataset column here); without
    loss_clip a regression run's CMI rows are NaN with the reason."""
    from kdsim import evaluation

    def kd_stage(ctx, so_far):
        return evaluation.StageOutput({"gen_S": np.zeros(ctx.run.resolved.static.num_datasets)})

    # the KD stages replaced by one gen_S column; the CMI stage kept
    kept = tuple(s for s in evaluation.STAGES if s[1] in (evaluation.cmi_stage,))
    monkeypatch.setattr(evaluation, "STAGES", (("estimators", kd_stage),) + kept)
    res = kdsim.simulate(LINEAR, progress=False)
    assert res.per_dataset.columns[:3].tolist() == ["dataset", "supersample", "mask"]
    np.testing.assert_array_equal(res.per_dataset["supersample"], np.repeat(np.arange(6), 16))
    np.testing.assert_array_equal(res.per_dataset["mask"], np.tile(np.arange(16), 6))
    assert res.pooled.loc["ldcmi_fast_upper", "family"] == "generic"
    assert np.isfinite(res.pooled.loc["ldcmi_fast_upper", "value"])
    res = kdsim.simulate({**LINEAR, "estimators.loss_clip": None}, progress=False)
    assert res.pooled.loc[list(ec.ROWS), "value"].isna().all()
    assert any("estimators.loss_clip = B" in n for n in res.notes)
