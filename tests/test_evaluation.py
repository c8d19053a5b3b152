"""The evaluation pipeline (kdsim/evaluation.py, one for every task): columns per loss,
test losses of KD and scratch students against a direct evaluation, bounds where their
assumptions hold, the predictive convexity KL, Laplace sharpness notes; the batched
estimators against their per-dataset definitions, the stage hook, and one compiled bound
program per CGF kind."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdsim
from kdsim import bound_tables, bounds, evaluation, stats
from kdsim.config import SimConfig
from kdsim.estimators import divergence, predictive
from kdsim.stats import bonferroni_z


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


# ---------------------------------------------------------------------- objectives, engine


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


# ---------------------------------------------------------------------- the pipeline itself


def _pairs(rng, E, P, p, drop=0.15):
    S = rng.normal(size=(E, P, p))
    T = 0.7 * S + 0.5 * rng.normal(size=(E, P, p)) + 0.2
    keep = rng.random((E, P)) > drop
    keep[0] = True                                   # one dataset with every pair
    return S, T, keep


def test_batched_estimators_equal_the_per_dataset_ones_on_the_kept_pairs():
    """Every dataset at once, with masks, equals the one-dataset estimator on the kept
    rows (jackknife groups included): no per-dataset loop changes a number."""
    rng = np.random.default_rng(0)
    E, P, p = 5, 70, 3
    S, T, keep = _pairs(rng, E, P, p)
    for batch, one in ((divergence.gaussian_full_batch, divergence.gaussian_full),
                       (divergence.gaussian_diag_batch, divergence.gaussian_diag),
                       (divergence.knn_batch, divergence.knn)):
        got = batch(S, T, keep)
        assert got.reason == ""
        for e in range(E):
            want = one(S[e, keep[e]], T[e, keep[e]])
            np.testing.assert_allclose([got.value[e], got.se[e]], [want.value, want.se], rtol=1e-9)
    mean, se = stats.masked_mean_se(S[..., 0], keep)
    for e in range(E):
        np.testing.assert_allclose([mean[e], se[e]], stats.mean_se(S[e, keep[e], 0]), rtol=1e-12)


def test_batched_decomposition_equals_the_per_dataset_jackknife():
    rng = np.random.default_rng(1)
    E, P, k, d, r = 4, 45, 2, 5, 3
    WS = rng.normal(size=(E, P, k, d))
    WT = 0.5 * WS + rng.normal(size=(E, P, k, d))
    X = rng.normal(size=(E, 20, d))
    G = np.einsum("eni,enj->eij", X, X)
    Pi = np.linalg.qr(rng.normal(size=(E, d, r)))[0]
    keep = rng.random((E, P)) > 0.2
    values, ses = predictive.decomposition_batch(WS, WT, G, Pi, r, keep)
    for e in range(E):
        v, s = predictive.decomposition(WS[e, keep[e]], WT[e, keep[e]], G[e], Pi[e], r)
        for f in v._fields:
            np.testing.assert_allclose(getattr(values, f)[e], getattr(v, f), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(getattr(ses, f)[e], getattr(s, f), rtol=1e-7, atol=1e-9)


def test_estimators_that_do_not_apply_say_why():
    rng = np.random.default_rng(2)
    S, T, keep = _pairs(rng, 2, 12, 4)                # P < 5 p: no full covariance
    assert "needs num_particles >= 5 x parameter dimension = 20" in divergence.gaussian_full_batch(S, T, keep).reason
    keep[1, 4:] = False                               # 4 pairs < knn_k + 2
    got = divergence.knn_batch(S, T, keep, k=5)
    assert np.isnan(got.value[1]) and np.isfinite(got.value[0]) and "knn_k + 2 = 7" in got.reason


def test_one_pipeline_and_its_stage_hook():
    """evaluation_mlp is gone; an extra stage sees the earlier columns and adds a
    column, a pooled row and a note."""
    assert not (Path(kdsim.__file__).parent / "evaluation_mlp.py").exists()
    run = kdsim.run_populations({"task": {"d": 2, "k": 1, "n": 16}, "num_datasets": 2, "num_particles": 16,
                                 "teacher": {"num_steps": 20}, "student": {"langevin": {"num_steps": 20}},
                                 "estimators": {"scratch": False}}, progress=False)

    def doubled_gap(ctx, so_far):
        row = bound_tables._pooled_table(None, "")
        row.loc["my_upper"] = [2.0, 1.0, 1.0, 1.0]
        return evaluation.StageOutput({"my_gap": 2 * so_far.columns["gen_S"]}, (row,), ("my note",))

    per, pooled, notes = evaluation.evaluate(run, extra_stages=(("bounds", doubled_gap),))
    np.testing.assert_array_equal(per["my_gap"], 2 * per["gen_S"])
    assert "my_upper" in pooled.index and "B0_upper" in pooled.index and "my note" in notes


def test_one_bound_program_serves_every_loss_family_and_similar_sizes():
    """sigma_bounded and has_b3 are traced and sizes are bucketed: datasets 3 and 5 of
    12 or 14 particles, bounded or not, with or without B3, run one compiled program."""
    rng = np.random.default_rng(3)
    before = bounds._empirical_family._cache_size()
    for E, P, sigma, b3 in ((3, 12, None, True), (5, 14, 1.0, False), (5, 12, None, False)):
        ok = rng.random((E, P)) > 0.05
        g = rng.normal(size=(E, P))
        z = np.zeros(E)
        inp = bound_tables.BoundInputs(
            gen_T=z, gen_T_se=z + 0.1, truth=z + 0.05, truth_se=z + 0.1, kl=z + 0.3, kl_se=z + 0.01,
            kl_reason="", g_T=g, ok=ok, usable=np.ones(E, bool), n_fit=8, cgf_kind="empirical",
            exact_cgfs=None, sharp={"G": z + 1, "S": z + 1, "rho": z + 0.1, "outside": z} if b3 else None,
            sharp_reason="", sigma_bounded=sigma, c_lam=0.5, ess_fraction=0.1)
        per, pooled = bound_tables.bound_arrays(inp)
        assert per.value.shape == (5, E) and np.all(np.isfinite(per.value[:4]))
        assert np.all(np.isnan(per.value[4])) != b3
        if sigma is not None:   # Hoeffding: B1 = gen_T + sqrt(2 sigma^2 KL)
            np.testing.assert_allclose(per.value[2], np.sqrt(2 * 0.3), rtol=1e-12)
    assert bounds._empirical_family._cache_size() - before <= 1


def test_jackknife_groups_follow_array_split_on_the_kept_entries():
    keep = np.array([[1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 0, 0, 1]], bool)
    masks, G = stats.jackknife_group_masks(keep, num_groups=3)
    assert G.tolist() == [3, 3]
    # row 0 keeps 5 entries in groups of 2, 2, 1 (np.array_split); row 1 keeps 4: 2, 1, 1
    kept0 = np.flatnonzero(keep[0])
    dropped = [kept0[~masks[0, g + 1, kept0]].tolist() for g in range(3)]
    assert dropped == [[0, 1], [3, 4], [5]]
    kept1 = np.flatnonzero(keep[1])
    assert [kept1[~masks[1, g + 1, kept1]].tolist() for g in range(3)] == [[0, 2], [3], [6]]
    assert not (masks & ~keep[:, None]).any()           # a dropped pair is in no mask
