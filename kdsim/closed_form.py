"""Closed forms of the linear Gaussian case study (SPEC §3), in float64 NumPy.

Every function is batched over a leading dataset axis E. Rows of W are independent
with a common covariance, so a law is a mean matrix ``M`` (k x d) and a row
covariance ``Sigma`` (d x d).

Finite-time laws of the two-phase protocol. The teacher chain is linear,
``w <- (I - h A_T) w + h gamma_T Cyx_j^T + sqrt(2h) xi``, so with ``A_T = U diag(lam) U^T``
and ``rho = 1 - h lam``, after T steps from ``N(0, s^2 I)``:

.. math::

    E w = U \\mathrm{diag}\\Big(\\frac{1-\\rho^T}{\\lambda}\\Big) U^T \\gamma C_{yx,j}^T, \\qquad
    \\mathrm{Cov}\\, w = U \\mathrm{diag}\\Big(\\rho^{2T} s^2 + \\frac{2(1-\\rho^{2T})}{\\lambda(2-h\\lambda)}\\Big) U^T.

The student's drift has the frozen partner ``w`` and frozen noise ``u`` as constant
inputs, so with ``B = I - h_S A_S`` and ``R = (I - B^{T_S}) A_S^{-1}``,
``v_T = B^{T_S} v_0 + R (c + K w + (1-alpha) nu_T u) + noise`` exactly, where
``c = alpha gamma_S Pi^T Cyx_j^T`` and ``K = (1 - alpha) gamma_S Pi^T Cxx``. The
stationary laws are the limits ``h -> 0, T -> inf`` (``R -> A_S^{-1}``, the Langevin
noise covariance -> ``A^{-1}``, the initial law forgotten).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import langevin
from .config import LangevinNumeric, Numeric, Static
from .stats import per_dataset
from .tasks.linear_gaussian import LinearData


class GaussianLaws(NamedTuple):
    """Laws of P and Q (and their coupling), leading axis E."""

    M_T: np.ndarray      # (E, k, d) teacher mean
    Sigma_T: np.ndarray  # (E, d, d) teacher row covariance
    M_S: np.ndarray      # (E, k, d) student mean (W_S = V Pi^T)
    Sigma_S: np.ndarray  # (E, d, d) student row covariance (rank r)
    C: np.ndarray        # (E, d, d) Cov(w_S row, w_T row)
    M_V: np.ndarray      # (E, k, r) student mean in its own coordinates
    Sigma_V: np.ndarray  # (E, r, r)
    C_V: np.ndarray      # (E, r, d) Cov(v row, w_T row)


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _spectral(U: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``U diag(f) U^T`` batched."""
    return (U * f[..., None, :]) @ _t(U)


def _power_terms(lam: np.ndarray, h: float, T: int | None):
    """``(1 - rho^T, rho^(2T), 1 - rho^(2T))`` with ``rho = 1 - h lam``, accurately.

    ``T = None`` is the stationary limit (``rho^T -> 0``).
    """
    if T is None:
        z = np.zeros_like(lam)
        return np.ones_like(lam), z, np.ones_like(lam)
    if T == 0:
        z = np.zeros_like(lam)
        return z, np.ones_like(lam), z
    rho = 1.0 - h * lam
    with np.errstate(divide="ignore", over="ignore"):
        log_abs = np.where(h * lam < 1.0, np.log1p(-np.minimum(h * lam, 1.0 - 1e-300)),
                           np.log(np.abs(rho)))
        rho_2T = np.exp(2.0 * T * log_abs)
        one_minus_rho_2T = -np.expm1(2.0 * T * log_abs)
        sign = np.where(rho < 0, (-1.0) ** (T % 2), 1.0)
        one_minus_rho_T = np.where(rho >= 0, -np.expm1(T * log_abs), 1.0 - sign * np.exp(T * log_abs))
    return one_minus_rho_T, rho_2T, one_minus_rho_2T


def _scheduled_terms(lam: np.ndarray, hs: np.ndarray, s_init: float):
    """``(R, cov)`` eigenvalues after the steps ``h_0, ..., h_{T-1}`` of a schedule.

    Per eigenvalue, with ``rho_t = 1 - h_t lam``:
    ``R = sum_t h_t prod_{s>t} rho_s`` and
    ``cov = s_init^2 prod_t rho_t^2 + sum_t 2 h_t prod_{s>t} rho_s^2``, iterated step by step
    (``x_{t+1} = rho_t x_t + h_t b``, noise ``2 h_t``).
    """
    R = np.zeros_like(lam)
    cov = np.full_like(lam, s_init**2)
    for h in hs:
        rho = 1.0 - h * lam
        R = rho * R + h
        cov = rho * rho * cov + 2.0 * h
    return R, cov


def chain_operators(A: np.ndarray, p: LangevinNumeric, T: int | None, schedule: str = "constant"):
    """Operators of a linear Langevin chain on ``U(w) = 0.5 w^T A w - b^T w``.

    Returns ``(R, Sigma)``: after T steps from ``N(0, s_init^2 I)`` the state is
    ``R b + N(0, Sigma)`` (stationary limit for ``T = None``: ``R = Sigma = A^{-1}``).
    Under a step-size schedule the chain is iterated with the engine's ``h_t``.
    """
    lam, U = np.linalg.eigh(A)
    h = p.step_size
    if T is not None and schedule != "constant":
        hs = langevin.step_sizes(schedule, h, T, p.schedule_offset)
        R, cov = _scheduled_terms(lam, hs, p.init_scale)
        return _spectral(U, R), _spectral(U, cov)
    one_minus_rho_T, rho_2T, one_minus_rho_2T = _power_terms(lam, h, T)
    R = _spectral(U, one_minus_rho_T / lam)
    if T is None:
        cov = 1.0 / lam
    else:
        cov = rho_2T * p.init_scale**2 + 2.0 * one_minus_rho_2T / (lam * (2.0 - h * lam))
    return R, _spectral(U, cov)


def stability_limit(A: np.ndarray) -> np.ndarray:
    """``2 / lambda_max(A)`` per dataset, ``(E,)``, for a batch of SPD matrices ``(E, d, d)``.

    The chain ``w <- (I - h A) w + ...`` contracts along every eigen-direction exactly when
    ``|1 - h lambda| < 1``, i.e. ``h < 2 / lambda_max``; at or beyond it the chain grows like
    ``|1 - h lambda_max|^T``.
    """
    return 2.0 / np.linalg.eigvalsh(0.5 * (A + _t(A)))[..., -1]


def precision_matrices(data: LinearData, numeric: Numeric) -> tuple[np.ndarray, np.ndarray]:
    """``(A_T, A_S)``: ``gamma_T Cxx + I/s0_T^2`` ``(E, d, d)`` and
    ``gamma_S Pi^T Cxx Pi + I/s0_S^2`` ``(E, r, r)``, the drifts' matrices."""
    pt, ps = numeric.teacher, numeric.student
    d, r = data.Cxx.shape[-1], data.Pi.shape[-1]
    A_T = pt.gamma * data.Cxx + np.eye(d) / pt.prior_scale**2
    A_S = ps.gamma * (_t(data.Pi) @ data.Cxx @ data.Pi) + np.eye(r) / ps.prior_scale**2
    return A_T, A_S


def _laws(data: LinearData, static: Static, numeric: Numeric, stationary: bool) -> GaussianLaws:
    pt, ps = numeric.teacher, numeric.student
    alpha, nu_T, n = numeric.alpha, numeric.teacher_noise, static.n
    Cxx, Cyx, Pi = data.Cxx, data.Cyx, data.Pi
    d, r = Cxx.shape[-1], Pi.shape[-1]

    A_T = pt.gamma * Cxx + np.eye(d) / pt.prior_scale**2
    R_T, Sigma_T = chain_operators(A_T, pt, None if stationary else static.teacher_steps,
                                   static.teacher_schedule)
    M_T = pt.gamma * Cyx @ R_T

    Cp = _t(Pi) @ Cxx @ Pi                                    # (E, r, r)
    A_S = ps.gamma * Cp + np.eye(r) / ps.prior_scale**2
    R_S, Sigma_free = chain_operators(A_S, ps, None if stationary else static.student_steps,
                                      static.student_schedule)
    K = (1.0 - alpha) * ps.gamma * _t(Pi) @ Cxx               # (E, r, d)
    M_V = (alpha * ps.gamma * Cyx @ Pi + (1.0 - alpha) * ps.gamma * M_T @ Cxx @ Pi) @ R_S
    RK = R_S @ K
    Sigma_V = (Sigma_free + RK @ Sigma_T @ _t(RK)
               + (1.0 - alpha) ** 2 * nu_T**2 * ps.gamma**2 / n * R_S @ Cp @ R_S)
    Sigma_V = 0.5 * (Sigma_V + _t(Sigma_V))
    C_V = RK @ Sigma_T
    return GaussianLaws(
        M_T=M_T, Sigma_T=Sigma_T, M_S=M_V @ _t(Pi), Sigma_S=Pi @ Sigma_V @ _t(Pi),
        C=Pi @ C_V, M_V=M_V, Sigma_V=Sigma_V, C_V=C_V)


def finite_time(data: LinearData, static: Static, numeric: Numeric) -> GaussianLaws:
    """Exact laws of the discretised two-phase chains after the configured steps."""
    return _laws(data, static, numeric, stationary=False)


def stationary(data: LinearData, static: Static, numeric: Numeric) -> GaussianLaws:
    """Stationary laws (h -> 0, steps -> inf): the Gibbs posteriors of SPEC §3."""
    return _laws(data, static, numeric, stationary=True)


# ---------------------------------------------------------------------------------------
# Functionals of the laws.


def expected_risks(M: np.ndarray, Sigma: np.ndarray, data: LinearData) -> tuple[np.ndarray, np.ndarray]:
    """``(E L_mu, E Lhat_D)`` for rows ~ N(M, Sigma); each ``(E,)``."""
    k = M.shape[-2]
    delta = M - data.W_star
    pop = 0.5 * (np.einsum("eki,i,eki->e", delta, data.sx, delta)
                 + k * np.einsum("eii,i->e", Sigma, data.sx) + k * data.noise**2)
    emp = 0.5 * (np.einsum("eki,eij,ekj->e", M, data.Cxx, M)
                 - 2.0 * np.einsum("eki,eki->e", data.Cyx, M) + data.Cyy
                 + k * np.einsum("eij,eji->e", Sigma, data.Cxx))
    return pop, emp


def expected_gaps(laws: GaussianLaws, data: LinearData) -> tuple[np.ndarray, np.ndarray]:
    """``(gen_T(D), gen_S(D))``, each ``(E,)``."""
    pop_t, emp_t = expected_risks(laws.M_T, laws.Sigma_T, data)
    pop_s, emp_s = expected_risks(laws.M_S, laws.Sigma_S, data)
    return pop_t - emp_t, pop_s - emp_s


def _logdet(A: np.ndarray) -> np.ndarray:
    sign, val = np.linalg.slogdet(A)
    return np.where(sign > 0, val, np.nan)


def kl_parameter(laws: GaussianLaws, full_student: bool) -> np.ndarray:
    """``KL(Q(.|D) || P(.|D))`` over the k rows, ``(E,)``; +inf for a rank-r student.

    .. math:: \\frac{k}{2}[\\mathrm{tr}(P_T\\Sigma_S) - d - \\log\\det(P_T\\Sigma_S)]
              + \\frac12 \\mathrm{tr}((M_S-M_T) P_T (M_S-M_T)^T),\\quad P_T = \\Sigma_T^{-1}.
    """
    E, k, d = laws.M_T.shape
    if not full_student:
        return np.full(E, np.inf)
    # non-finite or singular covariances give NaN for their dataset, never an exception
    return per_dataset(_kl_parameter, laws.M_T, laws.Sigma_T, laws.M_S, laws.Sigma_S)


def _kl_parameter(M_T, Sigma_T, M_S, Sigma_S):
    laws = GaussianLaws(M_T, Sigma_T, M_S, Sigma_S, *([None] * 4))
    k, d = M_T.shape[-2:]
    tr = np.trace(np.linalg.solve(laws.Sigma_T, laws.Sigma_S), axis1=-2, axis2=-1)
    logdet = _logdet(laws.Sigma_S) - _logdet(laws.Sigma_T)
    delta = laws.M_S - laws.M_T
    maha = np.einsum("eki,eki->e", delta, _t(np.linalg.solve(laws.Sigma_T, _t(delta))))
    return 0.5 * k * (tr - d - logdet) + 0.5 * maha


def kl_predictive(laws: GaussianLaws, G: np.ndarray, m: int, channel_noise: float) -> np.ndarray:
    """KL of the noisy predictions ``F = Xe W^T + nu_p z`` (m x k), Q against P, ``(E,)``.

    Each column j is ``N(Xe m_j, Xe Sigma Xe^T + nu_p^2 I_m)``; with ``G = Xe^T Xe`` and
    ``H_T = Xe^T B_T^{-1} Xe = (G Sigma_T + nu_p^2 I)^{-1} G`` (push-through identity) the
    m x m algebra reduces to d x d:

    .. math:: \\tfrac12 \\big[k(\\mathrm{tr}(H_T(\\Sigma_S - \\Sigma_T))
              + \\log\\det(\\nu_p^2 I + \\Sigma_T G) - \\log\\det(\\nu_p^2 I + \\Sigma_S G))
              + \\mathrm{tr}(\\Delta H_T \\Delta^T)\\big].
    """
    del m  # the m-dependence cancels between the trace and log-det terms
    return per_dataset(lambda M_T, S_T, M_S, S_S, G_: _kl_predictive(
        GaussianLaws(M_T, S_T, M_S, S_S, *([None] * 4)), G_, channel_noise),
        laws.M_T, laws.Sigma_T, laws.M_S, laws.Sigma_S, G)


def _kl_predictive(laws: GaussianLaws, G: np.ndarray, channel_noise: float) -> np.ndarray:
    k, d = laws.M_T.shape[-2:]
    nu2 = channel_noise**2
    eye = np.eye(d)
    H_T = np.linalg.solve(G @ laws.Sigma_T + nu2 * eye, G)
    H_T = 0.5 * (H_T + _t(H_T))
    tr = np.trace(H_T @ (laws.Sigma_S - laws.Sigma_T), axis1=-2, axis2=-1)
    logdets = _logdet(nu2 * eye + laws.Sigma_T @ G) - _logdet(nu2 * eye + laws.Sigma_S @ G)
    delta = laws.M_S - laws.M_T
    maha = np.einsum("eki,eij,ekj->e", delta, H_T, delta)
    return 0.5 * (k * (tr + logdets) + maha)


class Decomposition(NamedTuple):
    """SPEC §3 decomposition of ``E ||(W_S - W_T) Xe^T||_F^2``, each ``(E,)``."""

    bias: np.ndarray
    subspace: np.ndarray
    rank: np.ndarray
    variance: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.bias + self.subspace + self.rank + self.variance


def mean_terms(M_T: np.ndarray, M_S: np.ndarray, G: np.ndarray, Pi: np.ndarray,
               rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bias, subspace, rank)`` of the mean difference, each ``(E,)``.

    ``rank = sum_{i>r} sigma_i(M_T Xe^T)^2`` (Eckart--Young),
    ``subspace = ||M_T Xe^T (I - Pr)||^2 - rank`` with Pr the projector on ``col(Xe Pi)``,
    ``bias = ||(M_S - M_T) Xe^T||^2 - rank - subspace``.
    """
    return per_dataset(lambda a, b, c, e: _mean_terms(a, b, c, e, rank), M_T, M_S, G, Pi)


def _mean_terms(M_T, M_S, G, Pi, rank):
    k, d = M_T.shape[-2:]
    E = M_T.shape[0]
    MG = M_T @ G
    if rank >= min(k, d):  # structurally zero: keep rounding noise out of the tables
        rank_cost = np.zeros(E)
    else:
        sq_sing = np.linalg.eigvalsh(MG @ _t(M_T))[..., ::-1]      # (E, k) descending
        rank_cost = np.clip(sq_sing[..., rank:], 0.0, None).sum(-1)
    if rank >= d:  # the subspace is the whole space: Pr M_T Xe^T = M_T Xe^T
        subspace = np.zeros(E)
    else:
        total_T = np.einsum("eki,eki->e", MG, M_T)
        GPi = G @ Pi
        inner = np.linalg.pinv(_t(Pi) @ GPi, hermitian=True)
        proj = np.einsum("ekr,ers,eks->e", M_T @ GPi, inner, M_T @ GPi)
        subspace = total_T - proj - rank_cost
    delta = M_S - M_T
    bias = np.einsum("eki,eij,ekj->e", delta, G, delta) - rank_cost - subspace
    return bias, subspace, rank_cost


def decomposition(laws: GaussianLaws, G: np.ndarray, Pi: np.ndarray, rank: int) -> Decomposition:
    """Closed-form four-term decomposition on evaluation inputs with Gram ``G = Xe^T Xe``."""
    k = laws.M_T.shape[-2]
    bias, subspace, rank_cost = mean_terms(laws.M_T, laws.M_S, G, Pi, rank)
    diff_cov = laws.Sigma_S + laws.Sigma_T - laws.C - _t(laws.C)
    variance = k * np.einsum("eij,eji->e", G, diff_cov)
    return Decomposition(bias, subspace, rank_cost, variance)
