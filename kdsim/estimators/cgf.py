"""The cumulant generating function of the gap under the teacher (SPEC §3, §5).

``Lambda_D(lam) = log E_P exp(lam (g_D(w) - gen_T(D)))`` for ONE dataset, as a
:class:`CGF`: a callable on arrays of ``lam`` (negative ``lam`` is the lower tail,
``Lambda_D(-eta)``) together with the range on which it is finite or trusted.

*Exact* (linear task). ``g_D`` is quadratic with per-row Hessian ``Hg = Sx - Cxx``;
with ``K = Sigma_T^{1/2} Hg Sigma_T^{1/2} = U diag(kappa) U^T`` and
``A_i = sum_j (U^T Sigma_T^{1/2} grad g_j(M_T row j))_i^2``:

.. math::

    \\Lambda_D(\\lambda) = \\sum_i \\Big[ k\\big(-\\tfrac12\\log(1-\\lambda\\kappa_i)
        - \\tfrac12\\lambda\\kappa_i\\big) + \\frac{\\lambda^2 A_i}{2(1-\\lambda\\kappa_i)}\\Big],

finite exactly on ``1/kappa_min < lam < 1/kappa_max``.

*Empirical*: log-mean-exp over teacher particles of ``lam (g - mean g)``, trusted up to
the largest grid ``lam`` whose exponential weights keep an effective sample size of
at least ``ess_fraction * P``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from scipy.special import logsumexp

from ..stats import per_dataset

GRID_SIZE = 64
GRID_SPAN = (1e-3, 1e2)


class CGF(NamedTuple):
    """``Lambda_D`` of one dataset."""

    fn: Callable[[np.ndarray], np.ndarray]   # lam -> Lambda(lam) (+inf off the domain)
    ratio: Callable[[np.ndarray], np.ndarray]  # lam -> 2 Lambda(lam) / lam^2, stable at 0
    lam_sup: float      # Lambda usable for 0 < lam < lam_sup (exact: open; empirical: <=)
    eta_sup: float      # Lambda(-eta) usable for 0 < eta < eta_sup
    variance: float     # lim_{lam -> 0} 2 Lambda / lam^2 = Var_P g_D
    kind: str           # "exact" | "empirical"
    kappa_min: float = float("nan")
    kappa_max: float = float("nan")
    se: Callable[[np.ndarray], np.ndarray] | None = None  # Monte Carlo se (empirical)

    @property
    def scale(self) -> float:
        """sd_P(g_D), the natural unit of lam."""
        return float(np.sqrt(max(self.variance, 1e-300)))

    def grid(self, sign: int = 1) -> np.ndarray:
        """SPEC §5 grid: 64 geometric points in ``[1e-3, 1e2] / sd_P(g)`` inside the domain."""
        g = np.geomspace(*GRID_SPAN, GRID_SIZE) / self.scale
        sup = self.lam_sup if sign > 0 else self.eta_sup
        if self.kind == "exact":
            # the lower-tail grid stops at (1 - 1e-3)/|kappa_min| (SPEC §5)
            cap = (1 - 1e-3) * sup if np.isfinite(sup) else np.inf
            return g[g < cap]
        return g[g <= sup]


# --------------------------------------------------------------------------------------
# exact


def _chi(x: np.ndarray) -> np.ndarray:
    """``-(log(1 - x) + x) / x^2``, accurate near 0 (-> 1/2); +inf for x >= 1."""
    x = np.asarray(x, np.float64)
    small = np.abs(x) < 1e-2
    xs = np.where(small, x, 0.0)
    series = sum(xs ** (m - 2) / m for m in range(2, 10))
    with np.errstate(divide="ignore", invalid="ignore"):
        xb = np.where(small | (x >= 1), 0.5, x)
        big = -(np.log1p(-xb) + xb) / xb**2
    out = np.where(small, series, big)
    return np.where(x >= 1, np.inf, out)


def exact_terms(M_T: np.ndarray, Sigma_T: np.ndarray, Cxx: np.ndarray, Cyx: np.ndarray,
                W_star: np.ndarray, sx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(kappa, A)`` of the exact CGF, each ``(E, d)``, for teacher laws ``(M_T, Sigma_T)``;
    NaN for a dataset whose laws are not finite or whose eigendecomposition fails."""
    return per_dataset(lambda M, S, C, B: _exact_terms(M, S, C, B, W_star, sx), M_T, Sigma_T, Cxx, Cyx)


def _exact_terms(M_T, Sigma_T, Cxx, Cyx, W_star, sx):
    vals, vecs = np.linalg.eigh(Sigma_T)
    root = (vecs * np.sqrt(np.clip(vals, 0, None))[..., None, :]) @ np.swapaxes(vecs, -1, -2)
    Hg = np.diag(sx)[None] - Cxx
    K = root @ Hg @ root
    kappa, U = np.linalg.eigh(0.5 * (K + np.swapaxes(K, -1, -2)))
    # grad of row j's gap at the mean: Sx (m_j - w*_j) - (Cxx m_j - Cyx_j)
    grad = (M_T - W_star) * sx - M_T @ Cxx + Cyx                     # (E, k, d)
    a = grad @ root @ U                                               # (E, k, d) rows in U basis
    return kappa, np.sum(a * a, axis=-2)


def exact(kappa: np.ndarray, A: np.ndarray, k: int) -> CGF:
    """Exact CGF of one dataset from ``kappa`` ``(d,)`` and ``A`` ``(d,)`` (k output rows)."""
    kappa = np.asarray(kappa, np.float64)
    A = np.asarray(A, np.float64)
    kmax, kmin = float(kappa.max()), float(kappa.min())

    def ratio(lam):
        lam = np.asarray(lam, np.float64)[..., None]
        x = lam * kappa
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sum(k * kappa**2 * _chi(x) + np.where(x < 1, A / (1 - x), np.inf), axis=-1)
        return r

    def fn(lam):
        lam = np.asarray(lam, np.float64)
        return 0.5 * lam**2 * ratio(lam)

    return CGF(fn=fn, ratio=ratio,
               lam_sup=1.0 / kmax if kmax > 0 else np.inf,
               eta_sup=1.0 / -kmin if kmin < 0 else np.inf,
               variance=float(np.sum(k * kappa**2 / 2 + A)), kind="exact",
               kappa_min=kmin, kappa_max=kmax)


# --------------------------------------------------------------------------------------
# empirical


def empirical(g: np.ndarray, ess_fraction: float) -> CGF:
    """Empirical CGF from teacher-particle gaps ``g`` ``(n,)``."""
    g = np.asarray(g, np.float64)
    n = g.size
    c = g - g.mean()
    var = float(np.var(g, ddof=1))

    def fn(lam):
        lam = np.asarray(lam, np.float64)
        return logsumexp(lam[..., None] * c, axis=-1) - np.log(n)

    def ratio(lam):
        lam = np.asarray(lam, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(lam == 0, var, 2 * fn(lam) / lam**2)

    def ess(lam):
        return effective_sample_size(g, lam)

    def se(lam):
        # delta method: Var(log mean e^x) ~ (mean e^2x / (mean e^x)^2 - 1) / n = 1/ESS - 1/n
        return np.sqrt(np.clip(1.0 / ess(lam) - 1.0 / n, 0, None))

    base = np.geomspace(*GRID_SPAN, GRID_SIZE) / np.sqrt(max(var, 1e-300))
    ok_up = base[ess(base) >= ess_fraction * n]
    ok_dn = base[ess(-base) >= ess_fraction * n]
    return CGF(fn=fn, ratio=ratio,
               lam_sup=float(ok_up.max()) if ok_up.size else 0.0,
               eta_sup=float(ok_dn.max()) if ok_dn.size else 0.0,
               variance=var, kind="empirical", se=se)


def effective_sample_size(g: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """ESS of the weights ``exp(lam g)``, ``(L,)``."""
    x = np.asarray(lam, np.float64)[..., None] * (g - np.mean(g))
    return np.exp(2 * logsumexp(x, axis=-1) - logsumexp(2 * x, axis=-1))
