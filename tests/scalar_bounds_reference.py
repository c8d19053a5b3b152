"""Scalar reference of the bounds and CGFs, one dataset at a time (tests only).

A copy of kdsim's scalar bound code as it stood before the bounds were vectorised
(``kdsim/bounds.py`` and ``kdsim/estimators/cgf.py`` at commit b446758): NumPy, a dense
lambda grid refined by ``scipy.optimize.minimize_scalar``. The vectorised bounds must
reproduce it; it is kept here, not in the package, as the tests' independent reference.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

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
    """``(kappa, A)`` of the exact CGF, each ``(E, d)``, for teacher laws ``(M_T, Sigma_T)``."""
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
        # delta method for log mean e^{lam (g - gbar)}, centred at the sample mean: the
        # influence of particle i is w_i / mean w - 1 - lam (g_i - gbar) (issue 20's fix of
        # the shipped sqrt(1/ESS - 1/n), which was inflated at small lam)
        lam = np.asarray(lam, np.float64)[..., None]
        x = lam * c
        w = np.exp(x - x.max(axis=-1, keepdims=True))
        psi = w / w.mean(axis=-1, keepdims=True) - x
        return psi.std(axis=-1, ddof=1) / np.sqrt(n)

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


DENSE = 256
VALIDITY_Z = 3.0


def _search_range(cgf: CGF, sign: int) -> tuple[float, float]:
    sup = cgf.lam_sup if sign > 0 else cgf.eta_sup
    lo = 1e-6 / cgf.scale
    if cgf.kind == "exact":
        hi = sup * (1 - 1e-9) if np.isfinite(sup) else 1e6 / cgf.scale
    else:
        hi = sup
    return lo, hi


def dv_excess(kl: float, cgf: CGF, sign: int = 1,
              candidates: Iterable[float] = ()) -> tuple[float, float]:
    """``min_{lam > 0} (KL + Lambda(sign * lam)) / lam`` and its minimiser.

    ``(KL + Lambda(lam))/lam`` is unimodal in lam (Lambda is convex with Lambda(0) = 0),
    so a dense geometric grid plus a bounded scalar refinement finds the minimum (the
    package brackets with a coarser grid: agreement shows the grid does not matter);
    ``candidates`` (e.g. the optimal lam of B1 and B3) are always evaluated too and the
    smallest value found wins.
    At ``KL = 0`` the minimum is the ``lam -> 0`` limit, 0.
    """
    if kl == 0.0:
        return 0.0, 0.0
    if not math.isfinite(kl):
        return (math.inf if kl > 0 else math.nan), math.nan
    lo, hi = _search_range(cgf, sign)
    if not hi > lo:
        return math.inf, math.nan
    extra = np.asarray([c for c in candidates if np.isfinite(c) and 0 < c <= hi], np.float64)
    lams = np.geomspace(lo, hi, DENSE)
    objective = lambda lam: (kl + cgf.fn(sign * lam)) / lam
    vals = objective(lams)
    i = int(np.nanargmin(vals))
    best, best_lam = float(vals[i]), float(lams[i])
    a = math.log(lams[max(i - 1, 0)])
    b = math.log(lams[min(i + 1, DENSE - 1)])
    if b > a:
        res = minimize_scalar(lambda t: float(objective(np.exp(t))), bounds=(a, b),
                              method="bounded", options={"xatol": 1e-10})
        if res.fun < best:
            best, best_lam = float(res.fun), float(np.exp(res.x))
    if extra.size:      # every lam gives a valid bound: the smallest value found wins
        cvals = objective(extra)
        j = int(np.argmin(cvals))
        if cvals[j] < best:
            best, best_lam = float(cvals[j]), float(extra[j])
    return best, best_lam


def subgaussian_sigma2(cgf: CGF, lam_max: float) -> float:
    """``sup_{0 < lam <= lam_max} 2 Lambda(lam) / lam^2`` (includes the lam -> 0 limit Var)."""
    if cgf.kind == "empirical":
        grid = cgf.grid(+1)
        grid = grid[grid <= lam_max]
        vals = cgf.ratio(grid) if grid.size else np.zeros(0)
        return float(max(cgf.variance, vals.max() if vals.size else 0.0))
    hi = lam_max if np.isfinite(lam_max) else 1e6 / cgf.scale
    grid = np.geomspace(1e-6 / cgf.scale, hi, DENSE)
    vals = cgf.ratio(grid)
    best = float(max(cgf.variance, vals.max()))
    i = int(np.argmax(vals))
    a, b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, DENSE - 1)])
    if b > a:
        res = minimize_scalar(lambda t: -float(cgf.ratio(np.exp(t))), bounds=(a, b),
                              method="bounded", options={"xatol": 1e-10})
        best = max(best, -float(res.fun))
    return best


def subgaussian_excess(kl: float, sigma2: float, lam_max: float) -> tuple[float, float]:
    """B1's excess and the lam it uses: ``sqrt(2 sigma^2 KL)`` or the linear regime at lam_max."""
    if not math.isfinite(kl) or not math.isfinite(sigma2):
        return math.inf, math.nan
    sigma = math.sqrt(sigma2)
    if kl == 0.0:
        return 0.0, 0.0
    lam_star = math.sqrt(2 * kl) / sigma if sigma > 0 else math.inf
    if lam_star <= lam_max:
        return math.sqrt(2 * sigma2 * kl), lam_star
    # (the scalar code raised ZeroDivisionError here when lam_max = 0, i.e. no grid lam of
    # an empirical CGF passed the ESS rule; the vectorised bounds give +inf, as here)
    return (kl / lam_max if lam_max > 0 else math.inf) + lam_max * sigma2 / 2, lam_max


def subgaussian_bound(kl: float, cgf: CGF, lam_max: float) -> tuple[float, float, float]:
    """B1 with sigma from ``cgf``: ``(excess, lam used, sigma^2)``.

    sigma^2 is the sup of ``2 Lambda / lam^2`` over the grid (with the lam -> 0 limit)
    and over the lam that B1 itself uses, so the sub-Gaussian inequality holds exactly
    where the bound is evaluated (for an empirical CGF a grid alone can miss it there).
    """
    sigma2 = subgaussian_sigma2(cgf, lam_max)
    excess, lam = subgaussian_excess(kl, sigma2, lam_max)
    for _ in range(50):
        if not (np.isfinite(lam) and lam > 0):
            break
        r = float(cgf.ratio(np.asarray(lam)))
        if not r > sigma2 * (1 + 1e-12):
            break
        sigma2 = r
        excess, lam = subgaussian_excess(kl, sigma2, lam_max)
    return excess, lam, sigma2


class CentralResult(NamedTuple):
    excess: float
    eta: float
    eps: float


def central_excess(kl: float, cgf: CGF) -> CentralResult:
    """B2: ``min over the eta grid of eps(eta) + KL / eta``, ``eps(eta) = Lambda(-eta)/eta``."""
    if not math.isfinite(kl):
        return CentralResult(math.inf, math.nan, math.nan)
    etas = cgf.grid(-1)
    if etas.size == 0:
        return CentralResult(math.inf, math.nan, math.nan)
    eps = cgf.fn(-etas) / etas
    total = eps + kl / etas
    i = int(np.argmin(total))
    return CentralResult(float(total[i]), float(etas[i]), float(eps[i]))


def sharpness_sigma(G: float, S: float, rho: float) -> float:
    """``sigma_D(rho) = G rho + S rho^2 / 2``: half the range of g_D over the ball."""
    return G * rho + 0.5 * S * rho**2


def tightness_radius(G: float, S: float, sigma_ref: float) -> float:
    """``rho0 = (sqrt(G^2 + 2 S sigma_ref) - G) / S``: B3 beats B1 iff ``rho < rho0``."""
    if not (math.isfinite(sigma_ref) and sigma_ref >= 0):
        return math.nan
    if S > 0:
        return (math.sqrt(G * G + 2 * S * sigma_ref) - G) / S
    return sigma_ref / G if G > 0 else math.inf


def subgaussian_holds(check: CGF, sigma2: float, lam_max: float, z: float = VALIDITY_Z) -> bool:
    """Does ``check``'s ``Lambda(lam) <= lam^2 sigma^2 / 2`` on ``(0, lam_max]``?

    ``check`` is independent of the fit (the exact CGF, or held-out particles whose
    Monte Carlo error is allowed ``z`` standard errors).
    """
    if not math.isfinite(sigma2):
        return False
    if check.kind == "exact":
        hi = min(lam_max, check.lam_sup * (1 - 1e-9)) if np.isfinite(check.lam_sup) else lam_max
        if not np.isfinite(hi):
            hi = 1e6 / check.scale
        if np.isfinite(lam_max) and lam_max >= check.lam_sup:
            return False                 # Lambda is infinite inside the claimed range
        grid = np.geomspace(1e-6 / check.scale, hi, 4 * DENSE)
        return bool(np.all(check.ratio(grid) <= sigma2 * (1 + 1e-9)))
    grid = check.grid(+1)
    grid = grid[grid <= lam_max]
    if grid.size == 0:
        return True
    return bool(np.all(check.fn(grid) <= 0.5 * grid**2 * sigma2 + z * check.se(grid)))


def central_holds(check: CGF, eta: float, eps: float, z: float = VALIDITY_Z) -> bool:
    """Does the teacher satisfy ``Lambda(-eta) <= eta eps`` on independent data?"""
    if not (math.isfinite(eta) and math.isfinite(eps)):
        return False
    if check.kind == "exact":
        if eta >= check.eta_sup:
            return False
        return bool(check.fn(-eta) <= eta * eps * (1 + 1e-9) + 1e-300)
    return bool(check.fn(-eta) <= eta * eps + z * float(check.se(np.asarray(-eta))))


def holds(bound: float, truth: float, se: float, upper: bool, z: float = VALIDITY_Z) -> bool:
    """Does the bound hold on the truth, allowing ``z`` standard errors of Monte Carlo error?"""
    if math.isnan(bound) or math.isnan(truth):
        return False
    slack = z * se if math.isfinite(se) else 0.0
    return truth <= bound + slack if upper else truth >= bound - slack


def pooled(cgfs: list[CGF]) -> CGF:
    """``E_D Lambda_D`` over datasets as one CGF (domain: the intersection)."""
    kinds = {c.kind for c in cgfs}
    fn = lambda lam: np.mean([c.fn(lam) for c in cgfs], axis=0)
    ratio = lambda lam: np.mean([c.ratio(lam) for c in cgfs], axis=0)
    se = None
    if kinds == {"empirical"}:
        se = lambda lam: np.sqrt(np.sum([c.se(lam) ** 2 for c in cgfs], axis=0)) / len(cgfs)
    return CGF(fn=fn, ratio=ratio, lam_sup=min(c.lam_sup for c in cgfs),
               eta_sup=min(c.eta_sup for c in cgfs),
               variance=float(np.mean([c.variance for c in cgfs])),
               kind="exact" if kinds == {"exact"} else "empirical",
               kappa_min=min(c.kappa_min for c in cgfs), kappa_max=max(c.kappa_max for c in cgfs),
               se=se)


# --------------------------------------------------------------------------------------
# the per-dataset body and the pooled bounds of kdsim.evaluation.bound_columns (b446758)

BOUND_NAMES = ("B0_upper", "B0_lower", "B1_upper", "B2_lower", "B3_upper")
UPPER = {"B0_upper": True, "B0_lower": False, "B1_upper": True, "B2_lower": False, "B3_upper": True}


def b1_lam_max(cgf: CGF, c_lam: float) -> float:
    if cgf.kind == "exact":
        return c_lam / cgf.kappa_max if cgf.kappa_max > 0 else math.inf
    return cgf.lam_sup


def dataset(kl_raw, kl_se_raw, gT, gT_se, truth, truth_se, fit_cgf: CGF, check: CGF | None,
            c_lam: float, sigma_bounded: float | None = None, sharp: dict | None = None) -> dict:
    """All bounds of one dataset: ``{column: value}`` (flags 1.0 / 0.0, NaN if absent)."""
    out = {}
    kl_e = max(kl_raw, 0.0)
    kl_se_e = float(kl_se_raw) if np.isfinite(kl_se_raw) else 0.0
    if sigma_bounded is not None:
        lam_max, sigma2 = math.inf, sigma_bounded**2
        b1, lam_b1 = subgaussian_excess(kl_e, sigma2, lam_max)
        b1_holds = True
    else:
        lam_max = b1_lam_max(fit_cgf, c_lam)
        b1, lam_b1, sigma2 = subgaussian_bound(kl_e, fit_cgf, lam_max)
        b1_holds = None if check is None else subgaussian_holds(check, sigma2, lam_max)
    out["sigma_B1"], out["lam_max"] = math.sqrt(sigma2), lam_max
    out["rho0"] = math.nan
    if sharp is not None:
        G_D, S_D, rho = sharp["G"], sharp["S"], sharp["rho"]
        sig3 = math.sqrt(sharpness_sigma(G_D, S_D, rho) ** 2 + sharp.get("extra_var", 0.0))
        b3, lam_b3 = subgaussian_excess(kl_e, sig3**2, math.inf)
        out["rho0"] = tightness_radius(G_D, S_D, math.sqrt(sigma2))
        b3_holds = bool(sharp["outside"] == 0)
    else:
        b3, lam_b3, b3_holds = math.nan, math.nan, None
    central = central_excess(kl_e, fit_cgf)
    out["B2_eta"], out["B2_eps"] = central.eta, central.eps
    b0u, lam0 = dv_excess(kl_e, fit_cgf, +1, candidates=(lam_b1, lam_b3))
    b0l, eta0 = dv_excess(kl_e, fit_cgf, -1, candidates=fit_cgf.grid(-1))
    out["B0_lam"], out["B0_eta"] = lam0, eta0
    excess = {"B0_upper": b0u, "B0_lower": b0l, "B1_upper": b1, "B2_lower": central.excess,
              "B3_upper": b3}
    d_excess = {}
    if kl_se_e > 0 and math.isfinite(kl_e):
        kl2 = kl_e + kl_se_e
        d_excess = {
            "B0_upper": dv_excess(kl2, fit_cgf, +1, (lam_b1, lam_b3))[0] - b0u,
            "B0_lower": dv_excess(kl2, fit_cgf, -1, fit_cgf.grid(-1))[0] - b0l,
            "B1_upper": subgaussian_excess(kl2, sigma2, lam_max)[0] - b1,
            "B2_lower": central_excess(kl2, fit_cgf).excess - central.excess}
        if sharp is not None:
            d_excess["B3_upper"] = subgaussian_excess(kl2, sig3**2, math.inf)[0] - b3
    assumption = {
        "B0_upper": True, "B0_lower": True, "B1_upper": b1_holds,
        "B2_lower": None if check is None else central_holds(check, central.eta, central.eps),
        "B3_upper": b3_holds,
    }
    for name in BOUND_NAMES:
        out[name] = out[f"{name}_valid"] = out[f"{name}_assumption"] = math.nan
        if math.isnan(excess[name]):
            continue
        sign = 1.0 if UPPER[name] else -1.0
        value = gT + sign * excess[name]
        out[name] = value
        se = math.sqrt(gT_se**2 + d_excess.get(name, 0.0) ** 2 + truth_se**2)
        out[f"{name}_valid"] = float(holds(value, truth, se, UPPER[name]))
        if assumption[name] is not None:
            out[f"{name}_assumption"] = float(assumption[name])
    return out


def pooled_bounds(kl, gen_T, gen_T_se, truth, truth_se, cgfs: list[CGF], c_lam: float,
                  sigma_bounded: float | None = None) -> dict:
    """``{name: (value, truth, tightness, valid)}`` over the given datasets."""
    cg = pooled(cgfs)
    K_n = float(np.mean(np.maximum(kl, 0.0)))
    gT = float(np.mean(gen_T))
    se = float(np.sqrt(np.sum(gen_T_se**2 + truth_se**2)) / len(kl))
    tr = float(np.mean(truth))
    if sigma_bounded is not None:
        lam_max = math.inf
        b1, lam_b1 = subgaussian_excess(K_n, sigma_bounded**2, lam_max)
    else:
        lam_max = b1_lam_max(cg, c_lam)
        b1, lam_b1, _ = subgaussian_bound(K_n, cg, lam_max)
    b0u, _ = dv_excess(K_n, cg, +1, candidates=(lam_b1,))
    b0l, _ = dv_excess(K_n, cg, -1, candidates=cg.grid(-1))
    b2 = central_excess(K_n, cg).excess
    rows = {}
    for name, value, upper in (("B0_upper", gT + b0u, True), ("B0_lower", gT - b0l, False),
                               ("B1_upper", gT + b1, True), ("B2_lower", gT - b2, False)):
        tight = value - tr if upper else tr - value
        rows[name] = (value, tr, tight, float(holds(value, tr, se, upper)))
    return rows
