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

from ..stats import (jackknife_combine, jackknife_combine_rows, jackknife_group_masks,
                     jackknife_masks, masked_mean_se)

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


def _moments(x: np.ndarray, masks: np.ndarray, diag: bool):
    """Mean and covariance (ddof 1) of the rows of ``x`` ``(P, p)`` kept by each mask
    ``(G + 1, P)``, all masks at once: ``(G + 1, p)`` and ``(G + 1, p[, p])``."""
    counts = masks.sum(axis=1).astype(np.float64)
    m = (masks @ x) / counts[:, None]
    c = (x[None] - m[:, None]) * masks[..., None]                  # dropped rows -> 0
    if diag:
        return m, np.einsum("gpi,gpi->gi", c, c) / (counts - 1)[:, None]
    return m, np.einsum("gpi,gpj->gij", c, c) / (counts - 1)[:, None, None]


def _gaussian_kls(m0, S0, m1, S1) -> np.ndarray:
    """KL(N(m0, S0) || N(m1, S1)) for a batch ``(G,)`` (+inf where S0 is singular)."""
    ev0 = np.linalg.eigvalsh(S0)
    singular = ev0[:, 0] <= 1e-12 * np.maximum(ev0[:, -1], 1e-300)
    if singular.any():
        return np.array([np.inf if s else _gaussian_kl(a, b, c, d)
                         for s, a, b, c, d in zip(singular, m0, S0, m1, S1)])
    p = m0.shape[-1]
    L1, L0 = np.linalg.cholesky(S1), np.linalg.cholesky(S0)
    A = np.linalg.solve(L1, L0)
    diff = np.linalg.solve(L1, (m1 - m0)[..., None])[..., 0]
    diag = lambda L: np.log(np.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
    logdet = 2 * (diag(L1) - diag(L0))
    return 0.5 * (np.sum(A * A, axis=(-1, -2)) - p + np.sum(diff * diff, -1) + logdet)


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
    mS, SS = _moments(student, masks, diag=False)
    mT, ST = _moments(teacher, masks, diag=False)
    theta = _gaussian_kls(mS, SS, mT, ST)
    if np.isinf(theta[0]):
        return Estimate(float("inf"), float("nan"))
    est, se = jackknife_combine(theta)
    return Estimate(float(est), float(se))


def gaussian_diag(student: np.ndarray, teacher: np.ndarray, num_groups: int = 32) -> Estimate:
    """KL between moment-matched diagonal Gaussians (independent coordinates), jackknifed."""
    P, p = student.shape
    masks = jackknife_masks(P, num_groups)
    mS, vS = _moments(student, masks, diag=True)
    mT, vT = _moments(teacher, masks, diag=True)
    degenerate = np.any(vS <= 0, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = 0.5 * np.sum(vS / vT - 1.0 + (mS - mT) ** 2 / vT + np.log(vT / vS), axis=1)
    theta = np.where(degenerate, np.inf, theta)
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


# --------------------------------------------------------------------------------------
# every dataset at once: the estimators above for a batch ``(E, P, p)`` with a mask
# ``(E, P)`` of the pairs that count (diverged pairs are masked out), no loop over datasets


class Estimates(NamedTuple):
    """Per-dataset estimates ``(E,)``; NaN where the estimator does not apply, and why."""

    value: np.ndarray
    se: np.ndarray
    reason: str          # "" if it applies to every dataset


def _masked_moments(x: np.ndarray, masks: np.ndarray, diag: bool):
    """Means and covariances (ddof 1) of the rows of ``x`` ``(E, P, p)`` kept by each mask
    ``(E, M, P)``: ``(E, M, p)`` and ``(E, M, p[, p])``, from sums of the rows centred at
    the first mask's mean (no ``(E, M, P, p)`` array)."""
    w = masks.astype(np.float64)
    n = w.sum(axis=-1)                                                # (E, M)
    m0 = np.einsum("ep,epi->ei", w[:, 0], x) / n[:, :1]
    xc = x - m0[:, None]
    dm = np.einsum("emp,epi->emi", w, xc) / n[..., None]              # mean - m0
    if diag:
        s2 = np.einsum("emp,epi->emi", w, xc * xc)
        return m0[:, None] + dm, (s2 - n[..., None] * dm * dm) / (n - 1)[..., None]
    s2 = np.einsum("emp,epi,epj->emij", w, xc, xc)
    cov = (s2 - n[..., None, None] * dm[..., :, None] * dm[..., None, :]) / (n - 1)[..., None, None]
    return m0[:, None] + dm, cov


def _gaussian_kls_batch(m0, S0, m1, S1) -> tuple[np.ndarray, np.ndarray]:
    """KL(N(m0, S0) || N(m1, S1)) for any batch shape (+inf where S0 is singular), and
    where S1 is not positive definite (there NaN)."""
    p = m0.shape[-1]
    finite = (np.isfinite(S0).all((-1, -2)) & np.isfinite(S1).all((-1, -2))
              & np.isfinite(m0).all(-1) & np.isfinite(m1).all(-1))
    eye = np.eye(p)
    S0 = np.where(finite[..., None, None], S0, eye)
    S1 = np.where(finite[..., None, None], S1, eye)
    ev0, ev1 = np.linalg.eigvalsh(S0), np.linalg.eigvalsh(S1)
    singular = ev0[..., 0] <= 1e-12 * np.maximum(ev0[..., -1], 1e-300)
    not_pd = ev1[..., 0] <= 0
    S0 = np.where(singular[..., None, None], eye, S0)
    S1 = np.where(not_pd[..., None, None], eye, S1)
    L1, L0 = np.linalg.cholesky(S1), np.linalg.cholesky(S0)
    A = np.linalg.solve(L1, L0)
    diff = np.linalg.solve(L1, (np.where(finite[..., None], m1 - m0, 0.0))[..., None])[..., 0]
    diag = lambda L: np.log(np.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
    kl = 0.5 * (np.sum(A * A, axis=(-1, -2)) - p + np.sum(diff * diff, -1) + 2 * (diag(L1) - diag(L0)))
    kl = np.where(singular, np.inf, kl)
    return np.where(finite & ~not_pd, kl, np.nan), ~finite | not_pd


def _jackknifed(theta: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    est, se = jackknife_combine_rows(theta, G)
    inf = np.isinf(theta[:, 0])                # a degenerate student: KL = +inf, no se
    return np.where(inf, np.inf, est), np.where(inf, np.nan, se)


def gaussian_full_batch(student: np.ndarray, teacher: np.ndarray, keep: np.ndarray,
                        num_groups: int = 32) -> Estimates:
    """:func:`gaussian_full` of every dataset: ``(E, P, p)`` pairs, ``keep`` ``(E, P)``."""
    E, P, p = student.shape
    n = keep.sum(1)
    value, se = np.full(E, np.nan), np.full(E, np.nan)
    enough = n >= GAUSSIAN_FULL_MIN_RATIO * p
    reason = ("" if enough.all() else f"needs num_particles >= {GAUSSIAN_FULL_MIN_RATIO} x parameter "
              f"dimension = {GAUSSIAN_FULL_MIN_RATIO * p}, got {int(n[~enough].min())}")
    if not enough.any():
        return Estimates(value, se, reason)
    masks, G = jackknife_group_masks(keep[enough], num_groups)
    mS, SS = _masked_moments(student[enough], masks, diag=False)
    mT, ST = _masked_moments(teacher[enough], masks, diag=False)
    theta, failed = _gaussian_kls_batch(mS, SS, mT, ST)
    value[enough], se[enough] = _jackknifed(theta, G)
    bad = failed[:, 0]
    if bad.any():
        value[np.flatnonzero(enough)[bad]] = np.nan
        se[np.flatnonzero(enough)[bad]] = np.nan
        reason = reason or ("the teacher particles' covariance is not positive definite (or the "
                            "moments are not finite)")
    return Estimates(value, se, reason)


def gaussian_diag_batch(student: np.ndarray, teacher: np.ndarray, keep: np.ndarray,
                        num_groups: int = 32) -> Estimates:
    """:func:`gaussian_diag` of every dataset: ``(E, P, p)`` pairs, ``keep`` ``(E, P)``."""
    masks, G = jackknife_group_masks(keep, num_groups)
    mS, vS = _masked_moments(student, masks, diag=True)
    mT, vT = _masked_moments(teacher, masks, diag=True)
    degenerate = np.any(vS <= 0, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = 0.5 * np.sum(vS / vT - 1.0 + (mS - mT) ** 2 / vT + np.log(vT / vS), axis=-1)
    theta = np.where(degenerate, np.inf, theta)
    value, se = _jackknifed(theta, G)
    few = keep.sum(1) < 2
    return Estimates(np.where(few, np.nan, value), np.where(few, np.nan, se),
                     "needs at least 2 surviving pairs" if few.any() else "")


def knn_batch(student: np.ndarray, teacher: np.ndarray, keep: np.ndarray, k: int = 5) -> Estimates:
    """:func:`knn` of every dataset: ``(E, P, p)`` pairs, ``keep`` ``(E, P)``.

    Datasets in blocks of at most :data:`KNN_BLOCK_ELEMENTS` distances; the same
    ranking by ``|q|^2 + |r|^2 - 2 q.r`` and recomputed ``|q - r|^2`` as :func:`knn`,
    with the masked-out pairs' rows and columns out of every search.
    """
    E, P, p = student.shape
    n = keep.sum(1)
    value, se = np.full(E, np.nan), np.full(E, np.nan)
    reasons = []
    enough = n >= k + 2
    if not enough.all():
        reasons.append(f"needs num_particles >= knn_k + 2 = {k + 2}, got {int(n[~enough].min())}")
    block = max(1, KNN_BLOCK_ELEMENTS // (P * P))
    rho2, nu2 = np.full((E, P), np.nan), np.full((E, P), np.nan)
    eye = np.eye(P, dtype=bool)
    for lo in range(0, E if enough.any() else 0, block):   # blocks of datasets: bounded memory
        sl = slice(lo, lo + block)
        s, t, kp = student[sl], teacher[sl], keep[sl]
        for out, ref in ((rho2, s), (nu2, t)):
            d2 = (np.einsum("epi,epi->ep", s, s)[:, :, None] + np.einsum("epi,epi->ep", ref, ref)[:, None]
                  - 2.0 * np.einsum("epi,eqi->epq", s, ref))
            d2 = np.where(eye[None] | ~kp[:, None, :], np.inf, d2)   # itself / its partner, dropped
            idx = np.argpartition(d2, k - 1, axis=-1)[..., k - 1]
            diff = s - np.take_along_axis(ref, idx[..., None], axis=1)
            out[sl] = np.einsum("epi,epi->ep", diff, diff)
    use = keep & enough[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = 0.5 * p * np.log(nu2 / rho2)
    dup = (use & ((rho2 <= 0) | (nu2 <= 0))).any(1)
    if dup.any():
        reasons.append("duplicate particles (zero nearest-neighbour distance)")
    m, s_ = masked_mean_se(np.where(use, terms, 0.0), use, enough & ~dup)
    # + log(m / (n - 1)) with m = n - 1 teachers searched (all but the partner): 0
    value, se = m, s_
    return Estimates(value, se, "; ".join(reasons))
