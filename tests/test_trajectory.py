"""Trajectory bounds (SPEC §10): the engine's per-dataset sums against closed forms, the
generic bounds on the truth, and the Gibbs identity.

Linear task: the discretised chains are Gaussian at every step, so the expected per-step
terms ``E ||g_J - gbar||^2`` and ``E ||g_J||^2`` are closed forms of the step's mean and
covariance; they are propagated here in NumPy, independently of kdsim, and the engine's
Monte Carlo sums are compared by z-score (Bonferroni) with a check that the standard
errors are not inflated. The truths of the bounds are Monte Carlo gaps of the bounded
loss on fresh test points drawn here with NumPy.
"""

import jax
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

import kdsim
from kdsim import generic_bounds as gb
from kdsim import generic_tables
from kdsim import run_populations
from kdsim.config import resolve
from kdsim.stats import bonferroni_z

from helpers import config, z_spread_ok

E, P = 3, 400
LINEAR = {"task.d": 3, "task.k": 2, "task.n": 16, "student.rank": 2, "student.alpha": 0.3,
          "teacher.num_steps": 40, "student.langevin.num_steps": 30, "num_datasets": E,
          "num_particles": P, "seed": 5, "dtype": "float64", "estimators.scratch": False,
          "estimators.trajectory_examples": None}


def expected_sums(data, e, numeric, T_T, T_S, shift=0):
    """Closed-form ``[loo, zero]`` sums of the teacher and the student phase for dataset e.

    Per output row j the teacher row w is N(m_j, S) and the joint (w, v) of the student
    phase N(mu_j, Sigma); a per-example deviation linear in the state, ``L z - c``, has
    ``E ||L z - c||^2 = ||L mu - c||^2 + tr(L Sigma L^T)``. ``shift = 1`` evaluates the
    terms at the POST-step state instead (a deliberately wrong variant).
    """
    pt, ps, a = numeric.teacher, numeric.student, numeric.alpha
    X, Y, Pi = data.X[e], data.Y[e], data.Pi[e]
    n, d = X.shape
    k, r = Y.shape[1], Pi.shape[1]
    Cxx, Cyx = X.T @ X / n, Y.T @ X / n
    # teacher: g_ij = (w_j . x_i - y_ij) x_i; deviation (x_i x_i^T - Cxx) w_j - (y_ij x_i - Cyx_j)
    Dm = np.einsum("ia,ib->iab", X, X) - Cxx
    A_T = pt.gamma * Cxx + np.eye(d) / pt.prior_scale**2
    m = np.zeros((k, d))
    S = pt.init_scale**2 * np.eye(d)
    F_T = np.eye(d) - pt.step_size * A_T
    sq_x = np.sum(X * X, 1)
    teacher = np.zeros(2)

    def teacher_terms(m, S):
        dev = np.einsum("iab,kb->kia", Dm, m) - (Y.T[:, :, None] * X[None] - Cyx[:, None])
        loo = np.sum(dev**2) / n + k * np.einsum("iab,bc,iac->", Dm, S, Dm) / n
        res = m @ X.T - Y.T                                     # (k, n)
        zero = np.sum((res**2 + np.einsum("ia,ab,ib->i", X, S, X)[None]) * sq_x[None]) / n
        return np.array([loo / (n - 1) ** 2, zero / n**2])

    for _ in range(T_T):
        if shift:
            m, S = m @ F_T.T + pt.step_size * pt.gamma * Cyx, F_T @ S @ F_T.T + 2 * pt.step_size * np.eye(d)
        teacher += 0.25 * pt.step_size * pt.gamma**2 * teacher_terms(m, S)
        if not shift:
            m, S = m @ F_T.T + pt.step_size * pt.gamma * Cyx, F_T @ S @ F_T.T + 2 * pt.step_size * np.eye(d)
    # student: z = (w, e, v), e = row j's column of the frozen soft-label noise (n);
    # f = v . p_i, p_i = Pi^T x_i; t_ij = a y_ij + (1 - a)(w_j . x_i + nu e_ij)
    nu = numeric.teacher_noise
    p_ = X @ Pi                                                  # (n, r)
    Cp = p_.T @ p_ / n
    D = d + n + r
    sw, se_, sv = slice(0, d), slice(d, d + n), slice(d + n, D)
    L = np.zeros((n, r, D))
    L[:, :, sw] = -(1 - a) * (np.einsum("ia,ib->iab", p_, X) - Pi.T @ Cxx)
    L[:, :, se_] = -(1 - a) * nu * (np.einsum("ia,ib->iab", p_, np.eye(n)) - p_.T[None] / n)
    L[:, :, sv] = np.einsum("ia,ib->iab", p_, p_) - Cp
    c = a * (Y.T[:, :, None] * p_[None] - (Cyx @ Pi)[:, None])                  # (k, n, r)
    ell = np.zeros((n, D))
    ell[:, sw], ell[:, se_], ell[:, sv] = -(1 - a) * X, -(1 - a) * nu * np.eye(n), p_
    sq_p = np.sum(p_ * p_, 1)
    A_S = ps.gamma * Cp + np.eye(r) / ps.prior_scale**2
    h = ps.step_size
    F = np.eye(D)
    F[sv, sw] = h * (1 - a) * ps.gamma * Pi.T @ Cxx
    F[sv, se_] = h * (1 - a) * nu * ps.gamma * p_.T / n
    F[sv, sv] = np.eye(r) - h * A_S
    f = np.zeros((k, D))
    f[:, sv] = h * a * ps.gamma * Cyx @ Pi
    Q = np.zeros((D, D))
    Q[sv, sv] = 2 * h * np.eye(r)
    mu = np.zeros((k, D))
    mu[:, sw] = m
    Sig = np.zeros((D, D))
    Sig[sw, sw] = S
    Sig[se_, se_] = np.eye(n)
    Sig[sv, sv] = ps.init_scale**2 * np.eye(r)
    student = np.zeros(2)

    def student_terms(mu, Sig):
        dev = np.einsum("iab,kb->kia", L, mu) - c
        loo = np.sum(dev**2) / n + k * np.einsum("iab,bc,iac->", L, Sig, L) / n
        s = mu @ ell.T - a * Y.T                                 # (k, n)
        zero = np.sum((s**2 + np.einsum("ia,ab,ib->i", ell, Sig, ell)[None]) * sq_p[None]) / n
        return np.array([loo / (n - 1) ** 2, zero / n**2])

    for _ in range(T_S):
        if shift:
            mu, Sig = mu @ F.T + f, F @ Sig @ F.T + Q
        student += 0.25 * h * ps.gamma**2 * student_terms(mu, Sig)
        if not shift:
            mu, Sig = mu @ F.T + f, F @ Sig @ F.T + Q
    return teacher, student


def _z(run, cfg, shift=0):
    res = resolve(cfg)
    pops = run.populations
    z = []
    for e in range(E):
        want_T, want_S = expected_sums(run.data, e, res.numeric, res.static.teacher_steps,
                                       res.static.student_steps, shift)
        for got, want in ((pops.traj_teacher[e], want_T), (pops.traj_student[e], want_S)):
            mean, se = got.mean(0), got.std(0, ddof=1) / np.sqrt(got.shape[0])
            z.extend((mean - want) / se)
    return np.asarray(z)


@pytest.fixture(scope="module")
def linear_runs():
    """All n per step, the default sample of 1 per particle and step, and soft labels
    with channel noise (nu_T > 0: the linear fast path completes the per-example noise
    from its sufficient statistic)."""
    out = {}
    for m in (None, 1):
        cfg = config(**{**LINEAR, "estimators.trajectory_examples": m})
        out[m] = (cfg, run_populations(cfg))
    cfg = config(**{**LINEAR, "student.teacher_noise": 0.7})
    out["noisy"] = (cfg, run_populations(cfg))
    return out


@pytest.mark.parametrize("m", [None, 1, "noisy"])
def test_linear_sums_match_closed_form(linear_runs, m):
    cfg, run = linear_runs[m]
    z = _z(run, cfg)
    limit = bonferroni_z(z.size, 1e-3)
    assert np.abs(z).max() <= limit, z
    assert np.sum(z**2) <= sps.chi2.ppf(1 - 1e-3, z.size), z     # jointly, too
    ok, stat, lim = z_spread_ok(z)
    assert ok, f"standard errors inflated: sum z^2 = {stat:.3g} < {lim:.3g}"


def test_post_step_state_is_detected(linear_runs):
    """The same sums taken at the post-step state (a plausible off-by-one) fail the test."""
    cfg, run = linear_runs[None]
    z = _z(run, cfg, shift=1)
    assert np.sum(z**2) > sps.chi2.ppf(1 - 1e-3, z.size), z


def test_sampled_examples_cost_precision_not_bias(linear_runs):
    """A per-step sample of J's widens the spread over particles (its noise is in the
    standard error) but estimates the same sums (the closed-form test above)."""
    se = {m: linear_runs[m][1].populations.traj_teacher.std(1).mean() for m in (None, 1)}
    assert se[1] > se[None]


def _clipped_truth(run, B, rng, n_test=4000):
    """E_D gen_S(D) on the squared loss clipped at B, with its se: fresh NumPy test points."""
    data = run.data
    W = run.populations.student                                  # (E, P, k, d)
    gaps = []
    for e in range(W.shape[0]):
        x = rng.standard_normal((n_test, data.X.shape[-1])) * np.sqrt(data.sx)
        y = x @ data.W_star.T + data.noise * rng.standard_normal((n_test, data.W_star.shape[0]))
        loss = lambda X, Y: np.minimum(0.5 * np.sum((np.einsum("pkd,nd->pnk", W[e], X) - Y) ** 2, -1), B)
        gaps.append(loss(x, y).mean(1) - loss(data.X[e], data.Y[e]).mean(1))
    gaps = np.asarray(gaps)                                      # (E, P)
    return gaps.mean(), gaps.mean(1).std(ddof=1) / np.sqrt(gaps.shape[0])


REGIMES = [{"student.alpha": 1.0}, {"student.alpha": 0.3},
           {"student.alpha": 1.0, "teacher.gamma": 6.0, "student.langevin.gamma": 6.0}]


def _holds(value, truth, se):
    return value >= truth - 3 * se


@pytest.mark.parametrize("regime", REGIMES, ids=["scratch", "kd", "hot"])
def test_linear_bounds_hold(regime):
    """Each bound holds on the clipped-loss truth where its assumption holds (the generic
    single-run bounds: a student that does not distil; the KD split: always). Same shapes
    as the oracle runs: numeric changes only, no recompilation."""
    B = 1.0
    cfg = config(**{**LINEAR, **regime})
    run = run_populations(cfg)
    pops = run.populations
    truth, se = _clipped_truth(run, B, np.random.default_rng(0))
    loo_T, zero_T = pops.traj_teacher.mean((0, 1))
    loo_S, zero_S = pops.traj_student.mean((0, 1))
    assert _holds(gb.kd_split_bound(loo_T, loo_S, B), truth, se)
    if regime["student.alpha"] == 1.0:
        assert _holds(gb.incoherence_bound(loo_S, B), truth, se)
        assert _holds(gb.bayes_stability_bound(zero_S, B), truth, se)


MLP = {"task": {"name": "mlp_classification", "d": 4, "n": 24, "n_test": 8},
       "teacher": {"num_steps": 60, "step_size": 2e-3, "model": {"width": 12}},
       "student": {"model": {"width": 6}, "langevin": {"num_steps": 50}},
       "estimators": {"scratch": False, "trajectory_examples": 6},
       "num_datasets": 4, "num_particles": 48, "seed": 3}


def _zero_one_truth(run, rng, n_test=3000):
    """E_D gen_S(D) on the 0-1 loss: fresh points and labels from the planted network,
    drawn here with NumPy."""
    data, apply = run.data, run.models[1].apply
    A, Bm = np.asarray(data.A, np.float64), np.asarray(data.B, np.float64)
    d, width = Bm.shape[1], Bm.shape[0]
    scale = run.resolved.numeric.planted_scale
    gaps = []
    for e in range(data.X.shape[0]):
        x = rng.standard_normal((n_test, d))
        logits = scale * np.tanh(x @ Bm.T / np.sqrt(d)) @ A.T / np.sqrt(width)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y = (rng.random((n_test, 1)) > np.cumsum(p, 1)).sum(1)
        params = jax.tree_util.tree_map(lambda a: a[e], run.populations.student)
        err = lambda X, Y: np.mean(np.argmax(np.asarray(
            jax.vmap(apply, in_axes=(0, None))(params, X)), -1) != Y[None], axis=1)
        gaps.append(err(x.astype(np.float32), y) - err(data.X[e], data.Y[e]))
    gaps = np.asarray(gaps)
    return gaps.mean(), gaps.mean(1).std(ddof=1) / np.sqrt(gaps.shape[0])


def test_classification_bounds_hold():
    """Planted classification, three regimes (no distillation; distillation; a hotter
    run), a narrower student: each bound holds on the 0-1 truth (C = 1) where its
    assumption holds."""
    regimes = [{"student": {"alpha": 1.0}}, {"student": {"alpha": 0.4}},
               {"student": {"alpha": 1.0}, "teacher": {"gamma": 8.0}}]
    for regime in regimes:
        cfg = {k: (dict(v, **regime.get(k, {})) if isinstance(v, dict) else v) for k, v in MLP.items()}
        run = run_populations(cfg)
        pops = run.populations
        truth, se = _zero_one_truth(run, np.random.default_rng(1))
        loo_T, _ = pops.traj_teacher.mean((0, 1))
        loo_S, zero_S = pops.traj_student.mean((0, 1))
        assert _holds(gb.kd_split_bound(loo_T, loo_S, 1.0), truth, se), regime
        if regime["student"]["alpha"] == 1.0:
            assert _holds(gb.incoherence_bound(loo_S, 1.0), truth, se), regime
            assert _holds(gb.bayes_stability_bound(zero_S, 1.0), truth, se), regime


def test_bound_formulas():
    """Constants against the papers: sqrt(2 sigma^2 KL) with sigma = B/2 (Negrea et al.),
    2 sqrt(2) C sqrt(KL) (Li, Luo & Qiao, Theorem 9, KL already over n^2)."""
    assert np.isclose(gb.incoherence_bound(0.5, 2.0), np.sqrt(2 * 1.0 * 0.5))
    assert np.isclose(gb.bayes_stability_bound(0.5, 2.0), 2 * np.sqrt(2) * 2.0 * np.sqrt(0.5))
    assert np.isclose(gb.kd_split_bound(0.2, 0.3, 2.0), gb.incoherence_bound(0.5, 2.0))


# ---------------------------------------------------------------------------------------
# the Gibbs identity, closed forms only


def _gibbs_numpy(N, seed, d=3, k=2, n=24, nu=0.7, s0=1.2):
    """Independent NumPy draws of N linear datasets; the stationary Gibbs laws; the
    per-dataset gaps and the pair KLs by a plain double loop."""
    rng = np.random.default_rng(seed)
    gamma = n / nu**2
    W = rng.standard_normal((k, d)) / np.sqrt(d)
    sx = 1.0 / np.arange(1, d + 1)
    M, A, gen = [], [], []
    for _ in range(N):
        X = rng.standard_normal((n, d)) * np.sqrt(sx)
        Y = X @ W.T + nu * rng.standard_normal((n, k))
        a = gamma * X.T @ X / n + np.eye(d) / s0**2
        cov = np.linalg.inv(a)
        mean = gamma * (Y.T @ X / n) @ cov
        pop = 0.5 * (np.sum((mean - W) ** 2 * sx) + k * np.sum(np.diag(cov) * sx) + k * nu**2)
        emp = 0.5 * (np.sum((X @ mean.T - Y) ** 2) / n + k * np.trace(cov @ X.T @ X / n))
        M.append(mean), A.append(a), gen.append(pop - emp)
    M, A, gen = np.asarray(M), np.asarray(A), np.asarray(gen)
    cov = [np.linalg.inv(a) for a in A]
    logdet = [np.log(np.linalg.det(a)) for a in A]
    K = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            if i != j:   # KL(P_j || P_i), k rows
                dm = M[j] - M[i]
                K[i, j] = 0.5 * k * (np.trace(A[i] @ cov[j]) - d - logdet[i] + logdet[j]) \
                    + 0.5 * np.trace(dm @ A[i] @ dm.T)
    return M, A, gamma, gen, K


def test_gibbs_identity():
    """gamma E gen_T = E KL(P(.|D') || P(.|D)) over several hundred datasets: the pair
    mean agrees with the mean gap, its U-statistic se is honest (z spread over seeds), and
    a wrong gamma is detected."""
    zs = []
    for seed in range(12):
        M, A, gamma, gen, K = _gibbs_numpy(48, seed)
        g = gb.gibbs_identity(M, A, gamma, gen)
        off = ~np.eye(len(gen), dtype=bool)
        assert np.isclose(g.value, K[off].mean() / gamma, rtol=1e-9)     # the pair KLs
        zs.append((g.value - g.truth) / g.diff_se)
    zs = np.asarray(zs)
    assert np.abs(zs).max() <= bonferroni_z(zs.size, 1e-3), zs
    assert z_spread_ok(zs)[0], zs
    assert np.std(zs) < 1.8                                       # se not too small either
    M, A, gamma, gen, _ = _gibbs_numpy(400, 99)
    good = gb.gibbs_identity(M, A, gamma, gen)
    assert abs(good.value - good.truth) <= 3 * good.diff_se
    wrong = gb.gibbs_identity(M, A, 1.3 * gamma, gen)
    assert abs(wrong.value - wrong.truth) > 4 * wrong.diff_se


def test_tables_label_every_row(linear_runs):
    """The evaluation hook: trajectory columns per dataset, the generic rows, and
    ``family`` / ``loss`` on every pooled row (KD rows included)."""
    cfg, run = linear_runs[None]
    run = run._replace(config=cfg.replace({"estimators.loss_clip": 1.0}))
    per = pd.DataFrame({"dataset": np.arange(E)})
    kd = pd.DataFrame({"value": [1.0, 2.0], "truth": [0.5, 0.5], "tightness": [0.5, 1.5],
                       "valid": [1.0, 1.0]}, index=pd.Index(["B0_upper", "F_B0_upper"], name="bound"))
    per, pooled, notes = generic_tables.extend(run, per, kd, [])
    pops = run.populations
    assert np.allclose(per["traj_teacher"], pops.traj_teacher[..., 0].mean(1))
    assert np.allclose(per["traj_bs_student"], pops.traj_student[..., 1].mean(1))
    assert list(pooled.index) == ["B0_upper", "F_B0_upper", "incoherence_upper",
                                  "bayes_stability_upper", "kd_split_upper", "gibbs_identity"]
    assert list(pooled["family"]) == ["kd", "kd"] + ["generic"] * 4
    assert list(pooled["loss"]) == ["squared", "squared", "clipped", "clipped", "clipped", "squared"]
    assert np.all(np.isfinite(pooled["value"])) and np.all(np.isfinite(per["gen_S_clipped"]))
    # alpha = 0.3: the single-run generic bounds' assumption fails, the KD split's holds
    assert list(pooled["assumption"].iloc[2:5]) == [0.0, 0.0, 1.0]
    assert any("assumption False" in n for n in notes)
    # the truth agrees with the independent NumPy truth of the same populations
    truth, se = _clipped_truth(run, 1.0, np.random.default_rng(2))
    got = pooled.loc["kd_split_upper"]
    assert abs(got["truth"] - truth) <= 4 * np.hypot(got["truth_se"], se)
    classification = generic_tables.label_rows(kd, classification=True)
    assert list(classification["loss"]) == ["ce", "01"]


def test_sums_do_not_depend_on_the_layout(linear_runs):
    """Per-particle streams: the sums of a run split into particle chunks are the whole
    run's (SPEC §11), sampled examples included."""
    cfg, run = linear_runs[1]
    whole = run.populations
    chunked = run_populations(cfg.replace({"particle_chunk": P // 2})).populations
    for name in ("traj_teacher", "traj_student"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-9)


def test_large_n_does_not_overflow():
    """(n - 1)^2 beyond n = 46341 does not fit an int32: the sums stay finite and positive."""
    res = kdsim.simulate({"task": {"d": 2, "k": 1, "n": 50_000}, "teacher": {"num_steps": 5},
                          "num_datasets": 1, "num_particles": 4, "estimators": {"scratch": False}})
    for col in ("traj_teacher", "traj_student"):
        v = res.per_dataset[col].to_numpy(np.float64)
        assert np.all(np.isfinite(v) & (v > 0)), col


def test_no_student_steps_means_zero_student_sums_without_the_soft_labels():
    """A teacher-only run (student.langevin.num_steps = 0) carries the teacher's sums and
    zero student sums (nothing was accumulated), without building the partners'
    (E, P, n, k) soft labels."""
    pops = kdsim.run_populations({"task": {"d": 3, "k": 2, "n": 16}, "teacher": {"num_steps": 20},
                                  "student": {"langevin": {"num_steps": 0}},
                                  "num_datasets": 2, "num_particles": 4}).populations
    assert pops.traj_student.shape == (2, 4, 2) and not pops.traj_student.any()
    assert pops.traj_teacher.shape == (2, 4, 2) and (pops.traj_teacher > 0).all()
