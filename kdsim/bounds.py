"""Generalization bounds of SPEC §4 as array programs over datasets (SPEC §12).

Every function here is a pure ``jax.numpy`` function of ONE dataset's inputs (a CGF of
:mod:`kdsim.estimators.cgf` and scalars); :func:`dataset_bounds` and
:func:`pooled_bounds` vmap them over all datasets in one jitted program. Call them
under ``jax.enable_x64(True)``: bounds are float64.

All excess functions return the *excess* over the teacher's gap (``bound - gen_T`` for
upper bounds, ``gen_T - bound`` for lower bounds), so a bound on ``gen_S(D)`` is
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

Optimisation has a fixed cost: a geometric grid (``DV_GRID`` points: the DV objective is
unimodal), then ``GOLDEN_STEPS`` golden-section steps (in
``log lam``) between the grid neighbours of the best point; every sup /
self-consistency loop has a fixed number of iterations.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .estimators.cgf import PooledCGF, empirical_batch, geomspace

DV_GRID = 64              # DV's bracketing grid: its objective is unimodal, so any grid brackets
BLOCK_ELEMENTS = 1 << 23   # Lambda-grid numbers (lam x particle) held at once: 64 MiB
GOLDEN_STEPS = 48          # bracket <= 2 x 27.6 / 63 = 0.88 wide in log lam -> < 1e-10 after 48 steps
SELF_CONSISTENCY_STEPS = 50
VALIDITY_Z = 3.0
_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0


def _golden_min(f, a, b, steps: int = GOLDEN_STEPS):
    """Minimise a unimodal ``f`` on ``[a, b]`` by golden section: ``(x, f(x))``."""
    c = b - _INVPHI * (b - a)
    d = a + _INVPHI * (b - a)

    def body(_, s):
        a, b, c, d, fc, fd = s
        left = fc < fd                    # the minimum lies in [a, d]
        a2, b2 = jnp.where(left, a, c), jnp.where(left, d, b)
        c2 = jnp.where(left, b2 - _INVPHI * (b2 - a2), d)
        d2 = jnp.where(left, c, a2 + _INVPHI * (b2 - a2))
        new = f(jnp.where(left, c2, d2))  # one new evaluation per step
        fc2 = jnp.where(left, new, fd)
        fd2 = jnp.where(left, fc, new)
        return a2, b2, c2, d2, fc2, fd2

    a, b, c, d, fc, fd = jax.lax.fori_loop(0, steps, body, (a, b, c, d, f(c), f(d)))
    return jnp.where(fc <= fd, c, d), jnp.minimum(fc, fd)


def _search_range(cgf, sign):
    sup = jnp.where(sign > 0, cgf.lam_sup, cgf.eta_sup)
    lo = 1e-6 / cgf.scale
    if cgf.kind == "exact":
        hi = jnp.where(jnp.isfinite(sup), sup * (1 - 1e-9), 1e6 / cgf.scale)
    else:
        hi = sup
    return lo, hi


def dv_excess(kl, cgf, sign=1, candidates=None, candidate_mask=None):
    """``min_{lam > 0} (KL + Lambda(sign * lam)) / lam`` and its minimiser (each of
    ``kl``'s shape: several KLs share the grid's Lambda evaluations).

    ``sign`` (+1: upper tail, -1: lower tail) may be traced, so one vmapped call serves
    both tails.
    ``(KL + Lambda(lam))/lam`` is unimodal in lam (Lambda is convex with Lambda(0) = 0):
    a dense geometric grid, then golden-section refinement between the grid neighbours
    of the best grid point (the grid only brackets the minimum: unimodality makes the
    answer independent of its size). ``candidates`` ``(C,)`` (e.g. the optimal lam of B1
    and B3; ``candidate_mask`` marks the ones that count) are evaluated too and the
    smallest value found wins (every lam gives a valid bound). At ``KL = 0`` the minimum
    is the ``lam -> 0`` limit, 0.
    """
    lo, hi = _search_range(cgf, sign)
    ok_range = hi > lo
    hi_s = jnp.where(ok_range, hi, 2 * lo)
    lams = geomspace(lo, hi_s, DV_GRID)
    # Lambda on the grid and at the candidates does not depend on KL: computed once for
    # every KL of the batch (kl may be an array; Lambda's evaluations dominate the cost)
    L_grid = cgf.fn(sign * lams)
    if candidates is not None:
        cand = jnp.atleast_1d(jnp.asarray(candidates, jnp.float64))
        valid = jnp.isfinite(cand) & (cand > 0) & (cand <= hi)
        if candidate_mask is not None:
            valid &= candidate_mask
        safe = jnp.where(valid, cand, lo)
        L_cand = cgf.fn(sign * safe)

    def one(kl):
        objective = lambda lam: (kl + cgf.fn(sign * lam)) / lam
        vals = (kl + L_grid) / lams
        i = jnp.nanargmin(vals)
        best, best_lam = vals[i], lams[i]
        a = jnp.log(lams[jnp.maximum(i - 1, 0)])
        b = jnp.log(lams[jnp.minimum(i + 1, DV_GRID - 1)])
        t, ft = _golden_min(lambda t: objective(jnp.exp(t)), a, b)
        better = (b > a) & (ft < best)
        best, best_lam = jnp.where(better, ft, best), jnp.where(better, jnp.exp(t), best_lam)
        if candidates is not None:
            cvals = jnp.where(valid, (kl + L_cand) / safe, jnp.inf)
            j = jnp.argmin(cvals)
            # a candidate strictly below the refined grid minimum wins (ties go to the grid)
            wins = cvals[j] < best
            best, best_lam = jnp.where(wins, cvals[j], best), jnp.where(wins, safe[j], best_lam)
        best = jnp.where(ok_range, best, jnp.inf)
        best_lam = jnp.where(ok_range, best_lam, jnp.nan)
        finite = jnp.isfinite(kl)
        best = jnp.where(kl == 0, 0.0, jnp.where(finite, best, jnp.where(kl > 0, jnp.inf, jnp.nan)))
        best_lam = jnp.where(kl == 0, 0.0, jnp.where(finite, best_lam, jnp.nan))
        return best, best_lam

    kl = jnp.asarray(kl, jnp.float64)
    best, best_lam = jax.vmap(one)(kl.reshape(-1))
    return best.reshape(kl.shape), best_lam.reshape(kl.shape)


def subgaussian_sigma2(cgf, lam_max):
    """``sup_{0 < lam <= lam_max} 2 Lambda(lam) / lam^2``, including the lam -> 0 limit Var.

    Empirical CGF: over its grid. Exact: the endpoints, by :func:`_exact_ratio_sup`.
    """
    if cgf.kind == "empirical":
        g, m = cgf.grid(+1)
        m = m & (g <= lam_max)
        vals = jnp.where(m, cgf.ratio(g), -jnp.inf)
        return jnp.maximum(cgf.variance, vals.max())
    hi = jnp.where(jnp.isfinite(lam_max), lam_max, 1e6 / cgf.scale)
    return _exact_ratio_sup(cgf, hi)


def _exact_ratio_sup(cgf, hi):
    """``sup_{0 < lam <= hi} 2 Lambda(lam) / lam^2`` of an exact CGF (``hi`` inside its domain).

    The ratio is ``sum_i k kappa_i^2 chi(lam kappa_i) + A_i / (1 - lam kappa_i)`` with
    ``chi(x) = (-log(1 - x) - x) / x^2 = int_0^1 (1 - t) (1 - t x)^{-2} dt``, convex in x
    on x < 1 (its integrand is), and ``A_i >= 0``: a sum of convex functions of lam on the
    domain, so its sup over ``[0, hi]`` is at an endpoint: ``lam -> 0`` (the variance)
    or ``hi``. (tests/test_bounds_reference.py checks this against a dense grid refined
    by a scalar optimiser.)
    """
    return jnp.maximum(cgf.variance, cgf.ratio(hi))


def subgaussian_excess(kl, sigma2, lam_max):
    """B1's excess and the lam it uses: ``sqrt(2 sigma^2 KL)`` or the linear regime at lam_max."""
    sigma = jnp.sqrt(sigma2)
    lam_star = jnp.where(sigma > 0, jnp.sqrt(2 * kl) / jnp.where(sigma > 0, sigma, 1.0), jnp.inf)
    sqrt_regime = lam_star <= lam_max
    excess = jnp.where(sqrt_regime, jnp.sqrt(2 * sigma2 * kl),
                       kl / lam_max + lam_max * sigma2 / 2)
    lam = jnp.where(sqrt_regime, lam_star, lam_max)
    finite = jnp.isfinite(kl) & jnp.isfinite(sigma2)
    excess = jnp.where(finite, jnp.where(kl == 0, 0.0, excess), jnp.inf)
    lam = jnp.where(finite, jnp.where(kl == 0, 0.0, lam), jnp.nan)
    return excess, lam


class SubGaussian(NamedTuple):
    excess: jax.Array
    lam: jax.Array       # the lam B1 uses
    sigma2: jax.Array


def subgaussian_bound(kl, cgf, lam_max) -> SubGaussian:
    """B1 with sigma from ``cgf``.

    sigma^2 is the sup of ``2 Lambda / lam^2`` over the grid (with the lam -> 0 limit)
    and over the lam that B1 itself uses, so the sub-Gaussian inequality holds exactly
    where the bound is evaluated (for an empirical CGF a grid alone can miss it there):
    a fixed number of self-consistency steps, each raising sigma^2 to ``ratio(lam)``
    until it no longer grows.
    """
    sigma2 = subgaussian_sigma2(cgf, lam_max)
    excess, lam = subgaussian_excess(kl, sigma2, lam_max)

    def body(s):
        i, sigma2, excess, lam, done = s
        live = ~done & jnp.isfinite(lam) & (lam > 0)
        r = cgf.ratio(jnp.where(live, lam, 1.0) * 1.0)
        grow = live & (r > sigma2 * (1 + 1e-12))
        sigma2 = jnp.where(grow, r, sigma2)
        e2, l2 = subgaussian_excess(kl, sigma2, lam_max)
        return i + 1, sigma2, jnp.where(grow, e2, excess), jnp.where(grow, l2, lam), ~grow

    # at most SELF_CONSISTENCY_STEPS steps; a finished problem never changes again, so
    # stopping when every one (of a vmapped batch) is done gives the same numbers in the
    # one or two steps it usually takes
    _, sigma2, excess, lam, _ = jax.lax.while_loop(
        lambda s: (s[0] < SELF_CONSISTENCY_STEPS) & ~s[4], body,
        (jnp.zeros((), jnp.int32), sigma2, excess, lam, jnp.zeros((), bool)))
    return SubGaussian(excess, lam, sigma2)


class CentralResult(NamedTuple):
    excess: jax.Array
    eta: jax.Array
    eps: jax.Array


def central_excess(kl, cgf) -> CentralResult:
    """B2: ``min over the eta grid of eps(eta) + KL / eta``, ``eps(eta) = Lambda(-eta)/eta``."""
    etas, m = cgf.grid(-1)
    eps = cgf.fn(-etas) / etas
    total = jnp.where(m, eps + kl / etas, jnp.inf)
    i = jnp.argmin(total)
    ok = jnp.isfinite(kl) & m.any()
    return CentralResult(jnp.where(ok, total[i], jnp.inf), jnp.where(ok, etas[i], jnp.nan),
                         jnp.where(ok, eps[i], jnp.nan))


def sharpness_sigma(G, S, rho):
    """``sigma_D(rho) = G rho + S rho^2 / 2``: half the range of g_D over the ball."""
    return G * rho + 0.5 * S * rho**2


def tightness_radius(G, S, sigma_ref):
    """``rho0 = (sqrt(G^2 + 2 S sigma_ref) - G) / S``: B3 beats B1 iff ``rho < rho0``."""
    G, S, sigma_ref = jnp.asarray(G), jnp.asarray(S), jnp.asarray(sigma_ref)
    S_safe = jnp.where(S > 0, S, 1.0)
    curved = (jnp.sqrt(G * G + 2 * S * sigma_ref) - G) / S_safe
    flat = jnp.where(G > 0, sigma_ref / jnp.where(G > 0, G, 1.0), jnp.inf)
    ok = jnp.isfinite(sigma_ref) & (sigma_ref >= 0)
    return jnp.where(ok, jnp.where(S > 0, curved, flat), jnp.nan)


def subgaussian_holds(check, sigma2, lam_max, z: float = VALIDITY_Z):
    """Does ``check``'s ``Lambda(lam) <= lam^2 sigma^2 / 2`` on ``(0, lam_max]``?

    ``check`` is independent of the fit (the exact CGF, or held-out particles whose
    Monte Carlo error is allowed ``z`` standard errors).
    """
    if check.kind == "exact":
        sup = check.lam_sup
        hi = jnp.where(jnp.isfinite(sup), jnp.minimum(lam_max, sup * (1 - 1e-9)), lam_max)
        hi = jnp.where(jnp.isfinite(hi), hi, 1e6 / check.scale)
        # the ratio is convex in lam (see _exact_ratio_sup): its sup is at an endpoint
        ok = _exact_ratio_sup(check, hi) <= sigma2 * (1 + 1e-9)
        # Lambda is infinite inside the claimed range
        ok &= ~(jnp.isfinite(lam_max) & (lam_max >= sup))
    else:
        g, m = check.grid(+1)
        m = m & (g <= lam_max)
        ok = jnp.all(~m | (check.fn(g) <= 0.5 * g**2 * sigma2 + z * check.se(g)))
    return ok & jnp.isfinite(sigma2)


def central_holds(check, eta, eps, z: float = VALIDITY_Z):
    """Does the teacher satisfy ``Lambda(-eta) <= eta eps`` on independent data?"""
    finite = jnp.isfinite(eta) & jnp.isfinite(eps)
    eta_s = jnp.where(finite, eta, 0.0)
    lam = -eta_s
    if check.kind == "exact":
        ok = (check.fn(lam) <= eta * eps * (1 + 1e-9) + 1e-300) & (eta_s < check.eta_sup)
    else:
        ok = check.fn(lam) <= eta * eps + z * check.se(lam)
    return ok & finite


def holds(bound, truth, se, upper: bool, z: float = VALIDITY_Z):
    """Does the bound hold on the truth, allowing ``z`` standard errors of Monte Carlo error?"""
    slack = jnp.where(jnp.isfinite(se), z * se, 0.0)
    ok = truth <= bound + slack if upper else truth >= bound - slack
    return ok & ~jnp.isnan(bound) & ~jnp.isnan(truth)


def b1_lam_max(cgf, c_lam):
    """B1's lambda range: ``c_lam / kappa_max`` for an exact CGF (sub-exponential upper
    tail; inf when it is sub-Gaussian everywhere), the empirical CGF's usable range else."""
    if cgf.kind == "exact":
        kmax = cgf.kappa_max
        return jnp.where(kmax > 0, c_lam / jnp.where(kmax > 0, kmax, 1.0), jnp.inf)
    return cgf.lam_sup


# --------------------------------------------------------------------------------------
# all bounds of all datasets in one program

BOUND_NAMES = ("B0_upper", "B0_lower", "B1_upper", "B2_lower", "B3_upper")
UPPER = (True, False, True, False, True)


class DatasetInputs(NamedTuple):
    """Per-dataset inputs of the bounds (leading axis E), float64."""

    kl: jax.Array         # (E,) KL_D (negative estimates are clamped to 0)
    kl_se: jax.Array      # (E,) its standard error (non-finite -> 0)
    gen_T: jax.Array      # (E,)
    gen_T_se: jax.Array   # (E,)
    truth: jax.Array      # (E,) the student's true gap
    truth_se: jax.Array   # (E,)
    used: jax.Array       # (E,) bool: the dataset has bounds (usable and KL not NaN)
    has_check: jax.Array  # (E,) bool: independent data to judge the assumptions exist
    G: jax.Array          # (E,) B3: gradient norm of the gap at the centre
    S: jax.Array          # (E,) B3: curvature bound over the ball
    rho: jax.Array        # (E,) B3: radius of the teacher's ball
    outside: jax.Array    # (E,) B3: held-out teacher mass outside the ball
    extra_var: jax.Array  # (E,) B3: variance proxy added to sigma_D(rho)^2


class DatasetBounds(NamedTuple):
    """Bounds of every dataset, ``(E,)`` each; NaN where a bound does not apply.

    ``value``, ``valid`` and ``assumption`` are ``(5, E)`` in the order of
    :data:`BOUND_NAMES`; flags are 1.0 / 0.0, or NaN where they do not apply.
    """

    value: jax.Array
    valid: jax.Array
    assumption: jax.Array
    sigma_B1: jax.Array
    lam_max: jax.Array
    B0_lam: jax.Array
    B0_eta: jax.Array
    B2_eta: jax.Array
    B2_eps: jax.Array
    rho0: jax.Array


def _one_dataset(x: DatasetInputs, fit, check, c_lam, sigma_bounded, has_b3):
    """All bounds of one dataset (fields of ``x`` are scalars here).

    ``sigma_bounded`` (NaN: none) and ``has_b3`` are traced, so bounded and unbounded
    losses, with and without B3, share one compiled program: both branches run (the
    cost is a few Lambda evaluations) and the flag selects.
    """
    kl = jnp.maximum(x.kl, 0.0)               # KL >= 0: a negative estimate is noise around 0
    kl_se = jnp.where(jnp.isfinite(x.kl_se), x.kl_se, 0.0)
    perturb = (kl_se > 0) & jnp.isfinite(kl)
    # every excess at KL and at KL + se (the finite-difference Monte Carlo error of a bound)
    kls = jnp.stack([kl, kl + kl_se])
    bounded = ~jnp.isnan(sigma_bounded)      # a loss in [0, B]: sigma = B, no fit (Hoeffding)
    lam_max_fit = b1_lam_max(fit, c_lam)
    b1_fit, lam_b1_fit, sigma2_fit = subgaussian_bound(kl, fit, lam_max_fit)
    lam_max = jnp.where(bounded, jnp.inf, lam_max_fit)
    sigma2 = jnp.where(bounded, sigma_bounded**2, sigma2_fit)
    b1_hoeffding, lam_b1_hoeffding = subgaussian_excess(kl, sigma2, lam_max)
    b1 = jnp.where(bounded, b1_hoeffding, b1_fit)
    lam_b1 = jnp.where(bounded, lam_b1_hoeffding, lam_b1_fit)
    b1_holds = jnp.where(bounded, 1.0, jnp.where(
        x.has_check, subgaussian_holds(check, sigma2_fit, lam_max_fit), jnp.nan))
    b1_2 = subgaussian_excess(kls[1], sigma2, lam_max)[0]
    sig3 = jnp.sqrt(sharpness_sigma(x.G, x.S, x.rho) ** 2 + x.extra_var)
    b3, lam_b3 = subgaussian_excess(kl, sig3**2, jnp.inf)
    b3_2 = subgaussian_excess(kls[1], sig3**2, jnp.inf)[0]
    rho0 = tightness_radius(x.G, x.S, jnp.sqrt(sigma2))
    b3_holds = jnp.where(x.outside == 0, 1.0, 0.0)
    b3, b3_2, lam_b3, rho0, b3_holds = (jnp.where(has_b3, v, jnp.nan)
                                        for v in (b3, b3_2, lam_b3, rho0, b3_holds))
    central = jax.vmap(central_excess, in_axes=(0, None))(kls, fit)
    # B0 upper and lower at KL and KL + se: one vmapped search over the four problems
    # (candidates: the lam of B1 and B3 upward, B2's eta grid downward)
    etas, eta_mask = fit.grid(-1)
    up = jnp.concatenate([jnp.stack([lam_b1, lam_b3]), etas])
    up_mask = jnp.concatenate([jnp.ones(2, bool), jnp.zeros_like(eta_mask)])
    dn = jnp.concatenate([jnp.full(2, jnp.nan), etas])
    dn_mask = jnp.concatenate([jnp.zeros(2, bool), eta_mask])
    b0, lam0 = jax.vmap(lambda s_, c_, m_: dv_excess(kls, fit, s_, c_, m_))(
        jnp.asarray([1.0, -1.0]), jnp.stack([up, dn]), jnp.stack([up_mask, dn_mask]))
    b0, lam0 = b0.reshape(-1), lam0.reshape(-1)
    b0u, b0l, lam0, eta0 = b0[:2], b0[2:], lam0[:2], lam0[2:]
    b2_holds = jnp.where(x.has_check, central_holds(check, central.eta[0], central.eps[0]), jnp.nan)

    excess = jnp.stack([b0u[0], b0l[0], b1, central.excess[0], b3])
    excess2 = jnp.stack([b0u[1], b0l[1], b1_2, central.excess[1], b3_2])
    d_excess = jnp.where(perturb, excess2 - excess, 0.0)
    assumption = jnp.stack([jnp.asarray(1.0), jnp.asarray(1.0), b1_holds, b2_holds, b3_holds])
    sign = jnp.asarray([1.0 if u else -1.0 for u in UPPER])
    value = x.gen_T + sign * excess
    se = jnp.sqrt(x.gen_T_se**2 + d_excess**2 + x.truth_se**2)
    valid = jnp.stack([holds(value[b], x.truth, se[b], UPPER[b]) for b in range(len(UPPER))])
    applies = ~jnp.isnan(excess) & x.used
    nan = jnp.nan
    out = DatasetBounds(
        value=jnp.where(applies, value, nan),
        valid=jnp.where(applies, valid.astype(jnp.float64), nan),
        assumption=jnp.where(applies, assumption, nan),
        sigma_B1=jnp.sqrt(sigma2), lam_max=lam_max, B0_lam=lam0[0], B0_eta=eta0[0],
        B2_eta=central.eta[0], B2_eps=central.eps[0], rho0=rho0)
    scalars = {f: jnp.where(x.used, getattr(out, f), nan) for f in DatasetBounds._fields[3:]}
    return out._replace(**scalars)


def _dataset_bounds(x: DatasetInputs, fit, check, c_lam, sigma_bounded, has_b3) -> DatasetBounds:
    one = lambda a: _one_dataset(*a, c_lam, sigma_bounded, has_b3)
    # datasets in batches whose Lambda grids stay within BLOCK_ELEMENTS numbers (a power
    # of two, as the bucketed dataset count: no remainder batch, one copy of the body)
    size = max(_cgf_size(fit), _cgf_size(check))
    batch = max(1, min(x.kl.shape[0], BLOCK_ELEMENTS // (2 * DV_GRID * size)))
    out = jax.lax.map(one, (x, fit, check), batch_size=batch)
    return out._replace(value=out.value.T, valid=out.valid.T, assumption=out.assumption.T)


def _cgf_size(cgf) -> int:
    """Numbers one Lambda evaluation touches: particles (empirical) or eigenvalues (exact)."""
    return int((cgf.c if cgf.kind == "empirical" else cgf.kappa).shape[-1])


def _sigma(sigma_bounded: float | None):
    """A loss bound B as a traced float64 (NaN: none), so it never recompiles."""
    return jnp.float64(jnp.nan if sigma_bounded is None else sigma_bounded)


def dataset_bounds(x: DatasetInputs, fit, check, c_lam, *, sigma_bounded: float | None = None,
                   has_b3: bool = True) -> DatasetBounds:
    """B0--B3, their validity and assumption flags, for every dataset at once.

    Args:
      x: per-dataset inputs ``(E,)``.
      fit: the CGF batch ``[E, ...]`` the bounds use (fitted on the first teacher particles).
      check: a CGF batch ``[E, ...]`` independent of ``fit`` (the exact CGF or held-out
        particles) on which the assumptions are judged (where ``x.has_check``).
      c_lam: B1's ``lam_max = c_lam / kappa_max`` for an exact CGF.
      sigma_bounded: sigma = B of a loss bounded in [0, B]: B1 then needs no fit.
      has_b3: whether ``x``'s B3 inputs are given (else B3 is NaN).
    Returns:
      :class:`DatasetBounds`, ``value``/``valid``/``assumption`` ``(5, E)``, the rest ``(E,)``.
    """
    return all_bounds(x, fit, check, c_lam, sigma_bounded=sigma_bounded, has_b3=has_b3)[0]


class PooledBounds(NamedTuple):
    """Bounds on the dataset-averaged gap (B0 upper, B0 lower, B1 upper, B2 lower), ``(4,)``."""

    value: jax.Array
    truth: jax.Array     # ()
    tightness: jax.Array
    valid: jax.Array


POOLED_NAMES = ("B0_upper", "B0_lower", "B1_upper", "B2_lower")


def _pooled_bounds(x: DatasetInputs, fit, c_lam, sigma_bounded) -> PooledBounds:
    """Bounds with ``K_n = E_D KL_D`` and ``E_D Lambda_D`` (one lam for all datasets).

    SPEC §4: ``sigmabar^2 = sup 2 E_D Lambda_D / lam^2`` with lam_max common to all
    datasets (the mean of per-dataset sigma_D^2 would be valid and looser). Averages
    run over the datasets in ``x.used`` (at least one).
    """
    cg = PooledCGF(fit, x.used)
    n = x.used.sum()
    mean = lambda v: jnp.sum(jnp.where(x.used, v, 0.0)) / n
    K_n = mean(jnp.maximum(x.kl, 0.0))
    gT, truth = mean(x.gen_T), mean(x.truth)
    se = jnp.sqrt(jnp.sum(jnp.where(x.used, x.gen_T_se**2 + x.truth_se**2, 0.0))) / n
    bounded = ~jnp.isnan(sigma_bounded)
    b1_h, lam_h = subgaussian_excess(K_n, sigma_bounded**2, jnp.inf)
    b1_f, lam_f, _ = subgaussian_bound(K_n, cg, b1_lam_max(cg, c_lam))
    b1, lam_b1 = jnp.where(bounded, b1_h, b1_f), jnp.where(bounded, lam_h, lam_f)
    etas, eta_mask = cg.grid(-1)
    b0, _ = jax.vmap(lambda s_, c_, m_: dv_excess(K_n, cg, s_, c_, m_))(
        jnp.asarray([1.0, -1.0]), jnp.stack([jnp.concatenate([lam_b1[None], etas]),
                                             jnp.concatenate([jnp.asarray([jnp.nan]), etas])]),
        jnp.stack([jnp.concatenate([jnp.ones(1, bool), jnp.zeros_like(eta_mask)]),
                   jnp.concatenate([jnp.zeros(1, bool), eta_mask])]))
    b0u, b0l = b0[0], b0[1]
    b2 = central_excess(K_n, cg).excess
    value = jnp.stack([gT + b0u, gT - b0l, gT + b1, gT - b2])
    upper = (True, False, True, False)
    sign = jnp.asarray([1.0 if u else -1.0 for u in upper])
    valid = jnp.stack([holds(value[i], truth, se, u) for i, u in enumerate(upper)])
    return PooledBounds(value, truth, sign * (value - truth), valid.astype(jnp.float64))


def pooled_bounds(x: DatasetInputs, fit, c_lam, *, sigma_bounded: float | None = None) -> PooledBounds:
    """Bounds with ``K_n = E_D KL_D`` and ``E_D Lambda_D`` (one lam for all datasets).

    SPEC §4: ``sigmabar^2 = sup 2 E_D Lambda_D / lam^2`` with lam_max common to all
    datasets (the mean of per-dataset sigma_D^2 would be valid and looser). Averages
    run over the datasets in ``x.used`` (at least one).
    """
    return all_bounds(x, fit, fit, c_lam, sigma_bounded=sigma_bounded)[1]


# The bound programs run once per evaluation and take milliseconds, but XLA's CPU
# backend spent 2-4 s optimising each of them: cheaper code generation halves their
# compile time (measured in benchmarks/results/evaluation_cost_cpu.md) for a few
# milliseconds more run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@partial(jax.jit, compiler_options=FAST_COMPILE)
def _all_bounds(x, fit, check, c_lam, sigma_bounded, has_b3):
    return (_dataset_bounds(x, fit, check, c_lam, sigma_bounded, has_b3),
            _pooled_bounds(x, fit, c_lam, sigma_bounded))


def all_bounds(x: DatasetInputs, fit, check, c_lam, *, sigma_bounded: float | None = None,
               has_b3: bool = True) -> tuple[DatasetBounds, PooledBounds]:
    """:func:`dataset_bounds` and :func:`pooled_bounds` in ONE compiled program.

    One program per CGF kind and bucket of shapes: the loss bound ``sigma_bounded`` and
    ``has_b3`` are traced, so every loss and bound family of a run (and of every run of
    the same shapes) reuses it. The pooled bounds are NaN when no dataset is used.
    """
    return _all_bounds(x, fit, check, jnp.float64(c_lam), _sigma(sigma_bounded), jnp.bool_(has_b3))


@partial(jax.jit, compiler_options=FAST_COMPILE)
def _empirical_family(x, g, fit_mask, check_mask, ess_fraction, c_lam, sigma_bounded, has_b3, exact):
    fit = empirical_batch(g, fit_mask, ess_fraction)
    check = exact if exact is not None else empirical_batch(g, check_mask, ess_fraction)
    return _all_bounds.__wrapped__(x, fit, check, c_lam, sigma_bounded, has_b3)


def empirical_bounds(x: DatasetInputs, g, fit_mask, check_mask, ess_fraction, c_lam, *,
                     sigma_bounded: float | None = None, has_b3: bool = True,
                     exact=None) -> tuple[DatasetBounds, PooledBounds]:
    """:func:`all_bounds` with empirical CGFs built in the same program.

    Args:
      g: ``(E, N)`` teacher-particle gaps; fit_mask, check_mask: ``(E, N)`` the particles
        that fit the CGF the bounds use and the independent ones that check its
        assumptions (one array shape for both: one program).
      exact: an exact CGF batch to check the assumptions on instead (linear task), or None.
    """
    return _empirical_family(x, g, fit_mask, check_mask, jnp.float64(ess_fraction),
                             jnp.float64(c_lam), _sigma(sigma_bounded), jnp.bool_(has_b3), exact)
