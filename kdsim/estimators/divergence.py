"""Particle estimators of the distillation divergence ``KL(Q(.|D) || P(.|D))`` (SPEC §5).

For ONE dataset: ``student`` and ``teacher`` are ``(P, p)`` float64 arrays of flattened
parameters, row ``i`` of each a coupled pair. Each estimator returns an
:class:`Estimate` (value, standard error) or NaN with a reason (:class:`NotApplicable`).

None of these is an upper bound on KL_D in general; only ``exact`` (closed form) and
``girsanov`` (path space) keep a bound valid.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..stats import jackknife_combine, jackknife_masks

GAUSSIAN_FULL_MIN_RATIO = 5   # P >= 5 p for a usable full covariance (SPEC §5)


class Estimate(NamedTuple):
    value: float
    se: float


class NotApplicable(ValueError):
    """The estimator does not apply to these particles; the message says why."""


def _gaussian_kl(m0, S0, m1, S1) -> float:
    """KL(N(m0, S0) || N(m1, S1)); +inf if S0 is singular (a degenerate student)."""
    p = m0.shape[-1]
    if not (np.isfinite(S0).all() and np.isfinite(S1).all() and np.isfinite(m0).all()
            and np.isfinite(m1).all()):
        raise NotApplicable("the particles' moments are not finite")
    try:
        return _gaussian_kl_finite(m0, S0, m1, S1, p)
    except np.linalg.LinAlgError:
        raise NotApplicable("the teacher particles' covariance is not positive definite "
                            "(too ill-conditioned for a Cholesky factor)") from None


def _gaussian_kl_finite(m0, S0, m1, S1, p: int) -> float:
    L1 = np.linalg.cholesky(S1)
    ev0 = np.linalg.eigvalsh(S0)
    if ev0[0] <= 1e-12 * max(ev0[-1], 1e-300):
        return float("inf")
    A = np.linalg.solve(L1, np.linalg.cholesky(S0))
    diff = np.linalg.solve(L1, m1 - m0)
    logdet = 2 * (np.log(np.diag(L1)).sum() - np.log(np.diag(np.linalg.cholesky(S0))).sum())
    return float(0.5 * (np.sum(A * A) - p + diff @ diff + logdet))


def _moments(x: np.ndarray, mask: np.ndarray, diag: bool):
    w = x[mask]
    m = w.mean(axis=0)
    c = w - m
    if diag:
        return m, (c * c).sum(axis=0) / (len(w) - 1)
    return m, c.T @ c / (len(w) - 1)


def gaussian_full(student: np.ndarray, teacher: np.ndarray, num_groups: int = 32) -> Estimate:
    """KL between moment-matched full-covariance Gaussians, jackknife-debiased.

    Needs ``P >= 5 p`` (else :class:`NotApplicable`): below that the sample covariance
    is too noisy for its log-determinant to mean anything.
    """
    P, p = student.shape
    if P < GAUSSIAN_FULL_MIN_RATIO * p:
        raise NotApplicable(f"needs num_particles >= {GAUSSIAN_FULL_MIN_RATIO} x parameter "
                            f"dimension = {GAUSSIAN_FULL_MIN_RATIO * p}, got {P}")
    masks = jackknife_masks(P, num_groups)
    theta = []
    for mask in masks:
        mS, SS = _moments(student, mask, diag=False)
        mT, ST = _moments(teacher, mask, diag=False)
        theta.append(_gaussian_kl(mS, SS, mT, ST))
    theta = np.asarray(theta)
    if np.isinf(theta[0]):
        return Estimate(float("inf"), float("nan"))
    est, se = jackknife_combine(theta)
    return Estimate(float(est), float(se))


def gaussian_diag(student: np.ndarray, teacher: np.ndarray, num_groups: int = 32) -> Estimate:
    """KL between moment-matched diagonal Gaussians (independent coordinates), jackknifed."""
    P, p = student.shape
    masks = jackknife_masks(P, num_groups)
    theta = []
    for mask in masks:
        mS, vS = _moments(student, mask, diag=True)
        mT, vT = _moments(teacher, mask, diag=True)
        if np.any(vS <= 0):
            theta.append(np.inf)
            continue
        theta.append(0.5 * np.sum(vS / vT - 1.0 + (mS - mT) ** 2 / vT + np.log(vT / vS)))
    theta = np.asarray(theta)
    if np.isinf(theta[0]):
        return Estimate(float("inf"), float("nan"))
    est, se = jackknife_combine(theta)
    return Estimate(float(est), float(se))


KNN_BLOCK_ELEMENTS = 1 << 23   # query rows x population distances held at once (64 MiB)


def _kth_sq_distances(query: np.ndarray, ref: np.ndarray, k: int, block: int) -> np.ndarray:
    """Squared distance from query i to its k-th nearest row of ``ref`` other than row i.

    Blocked brute force: only a ``(block, n)`` slab of distances exists at a time, never
    the ``(n, n)`` matrix. Neighbours are ranked by the expansion ``|q|^2 + |r|^2 - 2 q.r``
    (one BLAS matmul per block, a linear-time partial sort per row) and the chosen
    neighbour's distance is then recomputed as ``|q - r|^2``, free of cancellation.
    """
    n = query.shape[0]
    ref_sq = np.einsum("ij,ij->i", ref, ref)
    out = np.empty(n)
    for lo in range(0, n, block):
        q = query[lo:lo + block]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + ref_sq[None] - 2.0 * (q @ ref.T)
        rows = np.arange(len(q))
        d2[rows, lo + rows] = np.inf                           # itself / its partner
        idx = np.argpartition(d2, k - 1, axis=1)[:, k - 1]
        diff = q - ref[idx]
        out[lo:lo + block] = np.einsum("ij,ij->i", diff, diff)
    return out


def knn(student: np.ndarray, teacher: np.ndarray, k: int = 5) -> Estimate:
    r"""Wang--Kulkarni--Verdu k-NN estimate, each student's partner removed from its search.

    .. math:: \hat D = \frac{p}{n} \sum_i \log\frac{\nu_k(i)}{\rho_k(i)} + \log\frac{m}{n-1},

    ``rho_k(i)``: distance from student i to its k-th nearest other student;
    ``nu_k(i)``: to its k-th nearest teacher among the ``m = n - 1`` non-partners.
    The standard error treats the n log-ratio terms as independent (they are weakly
    dependent through shared neighbours). Exact brute-force search in float64, blocked so
    memory is ``O(block x n)``; cost ``O(n^2 p)`` per dataset (BLAS).

    Consistent, but badly biased at practical particle counts in moderate dimension,
    and in any dimension when Q has heavier tails than P.
    """
    n, p = student.shape
    if n < k + 2:
        raise NotApplicable(f"needs num_particles >= knn_k + 2 = {k + 2}, got {n}")
    block = max(1, min(n, KNN_BLOCK_ELEMENTS // n))
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    rho2 = _kth_sq_distances(student, student, k, block)
    nu2 = _kth_sq_distances(student, teacher, k, block)
    if np.any(rho2 <= 0) or np.any(nu2 <= 0):
        raise NotApplicable("duplicate particles (zero nearest-neighbour distance)")
    terms = 0.5 * p * np.log(nu2 / rho2)
    m = n - 1                       # teachers searched: all but the partner
    value = terms.mean() + np.log(m / (n - 1))
    return Estimate(float(value), float(terms.std(ddof=1) / np.sqrt(n)))
