"""Closed forms against independent NumPy computations written here."""

import numpy as np
import pytest

from kdsim import closed_form
from kdsim.config import resolve

from helpers import config, data_for, gaussian_kl, propagate_joint

CASES = [dict(alpha=a, nu=nu, rank=r) for r in (None, 2) for a in (0.0, 0.3, 1.0) for nu in (0.0, 0.5)]


def _cfg(alpha, nu, rank, **extra):
    over = {"student.alpha": alpha, "student.teacher_noise": nu, "student.rank": rank,
            "num_datasets": 3}
    over.update(extra)
    return config(**over)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"a{c['alpha']}-nu{c['nu']}-r{c['rank']}")
def test_finite_time_matches_step_by_step_propagation(case):
    cfg = _cfg(case["alpha"], case["nu"], case["rank"])
    res = resolve(cfg)
    data = data_for(cfg)
    laws = closed_form.finite_time(data, res.static, res.numeric)
    for e in range(cfg.num_datasets):
        for j in range(cfg.task.k):
            mu, S, (sw, su, sv) = propagate_joint(
                data.Cxx[e], data.Cyx[e, j], data.Pi[e], cfg.task.n, res.numeric,
                res.static.teacher_steps, res.static.student_steps)
            np.testing.assert_allclose(laws.M_T[e, j], mu[sw], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(laws.M_V[e, j], mu[sv], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(laws.Sigma_T[e], S[sw, sw], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(laws.Sigma_V[e], S[sv, sv], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(laws.C_V[e], S[sv, sw], rtol=1e-10, atol=1e-12)
        Pi = data.Pi[e]
        np.testing.assert_allclose(laws.M_S[e], laws.M_V[e] @ Pi.T, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(laws.Sigma_S[e], Pi @ laws.Sigma_V[e] @ Pi.T, rtol=1e-12, atol=1e-14)


def test_stationary_matches_spec_formulas():
    cfg = _cfg(0.3, 0.5, 2)
    res = resolve(cfg)
    nm, n = res.numeric, cfg.task.n
    data = data_for(cfg)
    laws = closed_form.stationary(data, res.static, nm)
    a, g_T, g_S = nm.alpha, nm.teacher.gamma, nm.student.gamma
    for e in range(cfg.num_datasets):
        Cxx, Cyx, Pi = data.Cxx[e], data.Cyx[e], data.Pi[e]
        d, r = Pi.shape
        A_T = g_T * Cxx + np.eye(d) / nm.teacher.prior_scale**2
        A_Ti = np.linalg.inv(A_T)
        M_T = g_T * Cyx @ A_Ti
        A_S = g_S * Pi.T @ Cxx @ Pi + np.eye(r) / nm.student.prior_scale**2
        A_Si = np.linalg.inv(A_S)
        G = g_S * A_Si @ Pi.T @ Cxx
        M_S = (a * g_S * Cyx @ Pi @ A_Si + (1 - a) * M_T @ G.T) @ Pi.T
        Sig_S = Pi @ (A_Si + (1 - a) ** 2 * G @ A_Ti @ G.T
                      + (1 - a) ** 2 * nm.teacher_noise**2 * g_S**2 / n * A_Si @ Pi.T @ Cxx @ Pi @ A_Si) @ Pi.T
        C = (1 - a) * Pi @ G @ A_Ti
        np.testing.assert_allclose(laws.M_T[e], M_T, rtol=1e-10)
        np.testing.assert_allclose(laws.Sigma_T[e], A_Ti, rtol=1e-10)
        np.testing.assert_allclose(laws.M_S[e], M_S, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(laws.Sigma_S[e], Sig_S, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(laws.C[e], C, rtol=1e-10, atol=1e-13)


def test_finite_time_tends_to_stationary():
    errors = []
    for scale in (1.0, 0.1, 0.01):
        base = _cfg(0.3, 0.5, None)
        res = resolve(base)
        h_T, h_S = res.numeric.teacher.step_size * scale, res.numeric.student.step_size * scale
        steps = int(round(4000 / scale))  # T h lambda_min >> 1 at every scale
        cfg = base.replace({"teacher.step_size": h_T, "student.langevin.step_size": h_S,
                            "teacher.num_steps": steps, "student.langevin.num_steps": steps})
        r2 = resolve(cfg)
        data = data_for(cfg)
        ft = closed_form.finite_time(data, r2.static, r2.numeric)
        st = closed_form.stationary(data, r2.static, r2.numeric)
        err = max(np.abs(ft.Sigma_S - st.Sigma_S).max() / np.abs(st.Sigma_S).max(),
                  np.abs(ft.Sigma_T - st.Sigma_T).max() / np.abs(st.Sigma_T).max(),
                  np.abs(ft.M_S - st.M_S).max() / np.abs(st.M_S).max())
        errors.append(err)
    # the remaining discrepancy is the O(h) discretisation bias: it shrinks 10x per 10x in h
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[0] == pytest.approx(0.1, rel=0.15)
    assert errors[2] < 1e-3


@pytest.mark.parametrize("alpha, nu", [(0.0, 0.0), (0.3, 0.5), (1.0, 0.0)])
def test_parameter_kl_matches_direct_gaussian_kl(alpha, nu):
    cfg = _cfg(alpha, nu, None)
    res = resolve(cfg)
    data = data_for(cfg)
    for laws in (closed_form.finite_time(data, res.static, res.numeric),
                 closed_form.stationary(data, res.static, res.numeric)):
        kl = closed_form.kl_parameter(laws, full_student=True)
        for e in range(cfg.num_datasets):
            direct = sum(gaussian_kl(laws.M_S[e, j], laws.Sigma_S[e], laws.M_T[e, j], laws.Sigma_T[e])
                         for j in range(cfg.task.k))
            assert kl[e] == pytest.approx(direct, rel=1e-9)
    assert np.all(np.isinf(closed_form.kl_parameter(laws, full_student=False)))


@pytest.mark.parametrize("rank", [None, 2, 1])
def test_predictive_kl_matches_direct_m_by_m_computation(rank):
    cfg = _cfg(0.3, 0.5, rank)
    res = resolve(cfg)
    data = data_for(cfg)
    laws = closed_form.finite_time(data, res.static, res.numeric)
    nu_p = 0.7
    G = cfg.task.n * data.Cxx
    kl = closed_form.kl_predictive(laws, G, cfg.task.n, nu_p)
    for e in range(cfg.num_datasets):
        X = data.X[e]
        B_S = X @ laws.Sigma_S[e] @ X.T + nu_p**2 * np.eye(cfg.task.n)
        B_T = X @ laws.Sigma_T[e] @ X.T + nu_p**2 * np.eye(cfg.task.n)
        direct = sum(gaussian_kl(X @ laws.M_S[e, j], B_S, X @ laws.M_T[e, j], B_T)
                     for j in range(cfg.task.k))
        assert kl[e] == pytest.approx(direct, rel=1e-8)
        assert kl[e] > 0


@pytest.mark.parametrize("rank", [None, 2, 1])
def test_decomposition_sums_to_the_expected_squared_difference(rank):
    cfg = _cfg(0.3, 0.5, rank)
    res = resolve(cfg)
    data = data_for(cfg)
    laws = closed_form.finite_time(data, res.static, res.numeric)
    G = cfg.task.n * data.Cxx
    dec = closed_form.decomposition(laws, G, data.Pi, res.static.rank)
    for e in range(cfg.num_datasets):
        X = data.X[e]
        k = cfg.task.k
        diff_mean = (laws.M_S[e] - laws.M_T[e]) @ X.T
        cov_diff = laws.Sigma_S[e] + laws.Sigma_T[e] - laws.C[e] - laws.C[e].T
        expected = np.sum(diff_mean**2) + k * np.trace(X @ cov_diff @ X.T)
        assert dec.total[e] == pytest.approx(expected, rel=1e-10)
        # Eckart-Young: the rank cost is the tail of the singular values of M_T X^T
        sv = np.linalg.svd(laws.M_T[e] @ X.T, compute_uv=False)
        r = res.static.rank
        assert dec.rank[e] == pytest.approx(np.sum(sv[r:] ** 2), abs=1e-10)
        # subspace: projection of M_T X^T onto col(X Pi), computed with lstsq
        XP = X @ data.Pi[e]
        target = (laws.M_T[e] @ X.T).T                                  # (n, k)
        resid = target - XP @ np.linalg.lstsq(XP, target, rcond=None)[0]
        assert dec.subspace[e] + dec.rank[e] == pytest.approx(np.sum(resid**2), rel=1e-8, abs=1e-10)
        assert dec.bias[e] >= -1e-10 and dec.subspace[e] >= -1e-10 and dec.variance[e] > 0
    if rank is None:
        assert np.all(dec.subspace == 0) and np.all(dec.rank == 0)
    if rank == 1:
        assert np.all(dec.rank > 0) and np.all(dec.subspace > 0)


def test_expected_gaps_match_direct_formulas():
    cfg = _cfg(0.3, 0.5, 2)
    res = resolve(cfg)
    data = data_for(cfg)
    laws = closed_form.finite_time(data, res.static, res.numeric)
    gT, gS = closed_form.expected_gaps(laws, data)
    k, nu = cfg.task.k, cfg.task.noise
    Sx = np.diag(data.sx)
    for e in range(cfg.num_datasets):
        X, Y = data.X[e], data.Y[e]
        for g, M, S in ((gT[e], laws.M_T[e], laws.Sigma_T[e]), (gS[e], laws.M_S[e], laws.Sigma_S[e])):
            pop = 0.5 * (np.trace((M - data.W_star) @ Sx @ (M - data.W_star).T) + k * np.trace(S @ Sx) + k * nu**2)
            R = M @ X.T - Y.T
            emp = 0.5 * (np.trace(R @ R.T) / cfg.task.n + k * np.trace(S @ X.T @ X / cfg.task.n))
            assert g == pytest.approx(pop - emp, rel=1e-10)


def test_zero_steps_is_the_initial_law():
    cfg = _cfg(0.3, 0.5, None, **{"teacher.num_steps": 0, "student.langevin.num_steps": 0})
    res = resolve(cfg)
    laws = closed_form.finite_time(data_for(cfg), res.static, res.numeric)
    np.testing.assert_allclose(laws.Sigma_T, 1.3**2 * np.eye(4)[None].repeat(3, 0), atol=1e-14)
    np.testing.assert_allclose(laws.Sigma_S, 0.6**2 * np.eye(4)[None].repeat(3, 0), atol=1e-14)
    assert np.all(laws.M_T == 0) and np.all(laws.M_S == 0) and np.all(laws.C == 0)
