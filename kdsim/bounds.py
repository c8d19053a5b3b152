"""Generalization bounds of SPEC §4, as pure functions of per-dataset inputs.

All functions return the *excess* over the teacher's gap (``bound - gen_T`` for upper
bounds, ``gen_T - bound`` for lower bounds), so a bound on ``gen_S(D)`` is
``gen_T(D) ± excess``. Bounds never sample: randomness lives in their inputs.

- B0, Donsker--Varadhan: ``gen_S - gen_T <= min_lam (KL + Lambda(lam)) / lam`` and
  the mirror with ``lam = -eta``. No assumption; the tightest of all.
- B1, sub-Gaussian: ``sqrt(2 sigma^2 KL)`` if ``sqrt(2 KL)/sigma <= lam_max``, else
  ``KL / lam_max + lam_max sigma^2 / 2``.
- B2, eta-central with slack ``eps(eta) = Lambda(-eta)/eta``: ``eps + KL / eta``.
- B3, sharpness-aware: B1 with ``sigma_D(rho) = G rho + S rho^2 / 2``, ``lam_max = inf``.

B0's minimisation includes the optimal ``lam`` of B1 and B3 and B2's grid among its
candidates, so with the same CGF B0 is never looser than B1, B2 or B3 whenever their
assumptions hold at those points (SPEC §8).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar

from .estimators.cgf import CGF

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
    so a dense geometric grid plus a bounded scalar refinement finds the minimum;
    ``candidates`` (e.g. the optimal lam of B1 and B3) are always evaluated too.
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
    lams = np.concatenate([np.geomspace(lo, hi, DENSE), extra])
    objective = lambda lam: (kl + cgf.fn(sign * lam)) / lam
    vals = objective(lams)
    i = int(np.nanargmin(vals))
    best, best_lam = float(vals[i]), float(lams[i])
    if i < DENSE:
        a = math.log(lams[max(i - 1, 0)])
        b = math.log(lams[min(i + 1, DENSE - 1)])
        if b > a:
            res = minimize_scalar(lambda t: float(objective(np.exp(t))), bounds=(a, b),
                                  method="bounded", options={"xatol": 1e-10})
            if res.fun < best:
                best, best_lam = float(res.fun), float(np.exp(res.x))
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
    return kl / lam_max + lam_max * sigma2 / 2, lam_max


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
