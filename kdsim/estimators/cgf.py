"""The cumulant generating function of the gap under the teacher (SPEC §3, §5).

``Lambda_D(lam) = log E_P exp(lam (g_D(w) - gen_T(D)))`` as arrays: an :class:`ExactCGF`
or :class:`EmpiricalCGF` holds ONE dataset's parameters (or, with a leading axis ``E``,
a batch of them: ``jax.vmap`` the methods over it). Its methods evaluate ``Lambda`` on
arrays of ``lam`` (negative ``lam`` is the lower tail, ``Lambda_D(-eta)``) and give the
range on which it is finite or trusted. Every method is a pure ``jax.numpy`` function:
call it under ``jax.enable_x64(True)`` (CGFs are always float64, API.md).

*Exact* (linear task). ``g_D`` is quadratic with per-row Hessian ``Hg = Sx - Cxx``;
with ``K = Sigma_T^{1/2} Hg Sigma_T^{1/2} = U diag(kappa) U^T`` and
``A_i = sum_j (U^T Sigma_T^{1/2} grad g_j(M_T row j))_i^2``:

.. math::

    \\Lambda_D(\\lambda) = \\sum_i \\Big[ k\\big(-\\tfrac12\\log(1-\\lambda\\kappa_i)
        - \\tfrac12\\lambda\\kappa_i\\big) + \\frac{\\lambda^2 A_i}{2(1-\\lambda\\kappa_i)}\\Big],

finite exactly on ``1/kappa_min < lam < 1/kappa_max``.

*Empirical*: log-mean-exp over teacher particles of ``lam (g - mean g)``, trusted up to
the largest grid ``lam`` whose exponential weights keep an effective sample size of
at least ``ess_fraction * P``. Particles are given with a mask (diverged or held-out
ones are masked out), so every dataset of a batch has the same array shape.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..stats import per_dataset

GRID_SIZE = 64
POOLED_BLOCK_ELEMENTS = 1 << 23   # numbers one pooled evaluation holds at once (64 MiB)
GRID_SPAN = (1e-3, 1e2)


def geomspace(lo, hi, num: int) -> jax.Array:
    """``num`` geometric points from ``lo`` to ``hi`` (endpoints exact), ``(num,)``."""
    t = jnp.linspace(0.0, 1.0, num)
    pts = jnp.exp(jnp.log(lo) + t * (jnp.log(hi) - jnp.log(lo)))
    return pts.at[0].set(lo).at[-1].set(hi)


def _base_grid(scale) -> jax.Array:
    """SPEC §5: 64 geometric points in ``[1e-3, 1e2] / sd_P(g)``, ``(64,)``."""
    return jnp.asarray(np.geomspace(*GRID_SPAN, GRID_SIZE)) / scale


class ExactCGF(NamedTuple):
    """Exact ``Lambda_D`` of the linear task: ``kappa``, ``A`` ``[..., d]``, ``k`` ``[...]``."""

    kappa: jax.Array   # [..., d] eigenvalues of Sigma_T^{1/2} Hg Sigma_T^{1/2}
    A: jax.Array       # [..., d] squared mean-gradient components in that basis
    k: jax.Array       # [...] number of output rows (float)

    kind = "exact"

    @property
    def kappa_max(self):
        return self.kappa.max(-1)

    @property
    def kappa_min(self):
        return self.kappa.min(-1)

    @property
    def lam_sup(self):
        """Lambda finite for ``0 < lam < lam_sup`` (open)."""
        kmax = self.kappa_max
        return jnp.where(kmax > 0, 1.0 / jnp.where(kmax > 0, kmax, 1.0), jnp.inf)

    @property
    def eta_sup(self):
        """Lambda(-eta) finite for ``0 < eta < eta_sup`` (open)."""
        kmin = self.kappa_min
        return jnp.where(kmin < 0, 1.0 / jnp.where(kmin < 0, -kmin, 1.0), jnp.inf)

    @property
    def variance(self):
        """``lim_{lam -> 0} 2 Lambda / lam^2 = Var_P g_D``."""
        return jnp.sum(self.k[..., None] * self.kappa**2 / 2 + self.A, axis=-1)

    @property
    def scale(self):
        """sd_P(g_D), the natural unit of lam."""
        return jnp.sqrt(jnp.maximum(self.variance, 1e-300))

    def ratio(self, lam):
        """``2 Lambda(lam) / lam^2``, stable at 0, +inf off the domain (one dataset)."""
        lam = jnp.asarray(lam)
        kappa, A = _lift(self.kappa, lam), _lift(self.A, lam)
        x = lam[..., None] * kappa
        inside = x < 1
        pole = A / jnp.where(inside, 1 - x, 1.0)
        return jnp.sum(self.k * kappa**2 * _chi(x) + jnp.where(inside, pole, jnp.inf), axis=-1)

    def fn(self, lam):
        """``Lambda(lam)`` (+inf off the domain) for ``lam`` of any shape (one dataset)."""
        lam = jnp.asarray(lam)
        return 0.5 * lam**2 * self.ratio(lam)

    def se(self, lam):
        return jnp.zeros_like(jnp.asarray(lam, jnp.float64))

    def grid(self, sign: int = 1) -> tuple[jax.Array, jax.Array]:
        """SPEC §5 grid ``(64,)`` and the mask of its points inside the domain (one dataset);
        the lower-tail grid stops at ``(1 - 1e-3)/|kappa_min|``."""
        g = _base_grid(self.scale)
        sup = self.lam_sup if sign > 0 else self.eta_sup
        return g, g < (1 - 1e-3) * sup


def _lift(v, lam):
    """``v`` ``(d,)`` shaped to broadcast against ``lam[..., None]`` without rank promotion."""
    v = jnp.asarray(v)
    return v.reshape((1,) * jnp.ndim(lam) + v.shape)


def _chi(x):
    """``-(log(1 - x) + x) / x^2``, accurate near 0 (-> 1/2); +inf for x >= 1."""
    small = jnp.abs(x) < 1e-2
    xs = jnp.where(small, x, 0.0)
    series = sum(xs ** (m - 2) / m for m in range(2, 10))
    xb = jnp.where(small | (x >= 1), 0.5, x)
    big = -(jnp.log1p(-xb) + xb) / xb**2
    return jnp.where(x >= 1, jnp.inf, jnp.where(small, series, big))


def exact(kappa, A, k) -> ExactCGF:
    """Exact CGF from ``kappa``, ``A`` ``[..., d]`` (``k`` output rows), as float64 NumPy
    arrays (they become JAX arrays where a jitted program consumes them)."""
    kappa = np.asarray(kappa, np.float64)
    return ExactCGF(kappa, np.asarray(A, np.float64),
                    np.broadcast_to(np.float64(k), kappa.shape[:-1]).copy())


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


# --------------------------------------------------------------------------------------
# empirical


class EmpiricalCGF(NamedTuple):
    """Empirical ``Lambda_D`` from masked teacher-particle gaps (one dataset, or ``[E, ...]``)."""

    c: jax.Array         # [..., N] centred gaps g - mean g (0 where masked out)
    w: jax.Array         # [..., N] bool: the particle counts
    lam_sup: jax.Array   # [...] largest grid lam with ESS >= ess_fraction * n (0 if none)
    eta_sup: jax.Array   # [...] the same for the lower tail
    variance: jax.Array  # [...] Var g (ddof 1) over the counted particles

    kind = "empirical"

    @property
    def n(self):
        return self.w.sum(-1)

    @property
    def scale(self):
        return jnp.sqrt(jnp.maximum(self.variance, 1e-300))

    def _lse(self, lam, power: int = 1):
        lam = jnp.asarray(lam)
        x = lam[..., None] * _lift(self.c, lam) * power
        return jax.nn.logsumexp(jnp.where(_lift(self.w, lam), x, -jnp.inf), axis=-1)

    def fn(self, lam):
        """``log mean exp(lam c)`` over the counted particles, ``lam`` of any shape."""
        return self._lse(lam) - jnp.log(self.n)

    def ratio(self, lam):
        lam = jnp.asarray(lam)
        safe = jnp.where(lam == 0, 1.0, lam)
        return jnp.where(lam == 0, self.variance, 2 * self.fn(safe) / safe**2)

    def ess(self, lam):
        """Effective sample size of the weights ``exp(lam g)``."""
        return jnp.exp(2 * self._lse(lam) - self._lse(lam, 2))

    def se(self, lam):
        """Monte Carlo se of ``fn`` by the delta method.

        The influence of particle i on ``log mean e^{lam (g - gbar)}`` is
        ``psi_i = w_i / mean w - 1 - lam (g_i - gbar)`` with ``w = e^{lam (g - gbar)}``;
        the last term is the centring at the sample mean, which cancels the O(lam) part
        (without it the error is ``sqrt(1/ESS - 1/n) ~ lam sd(g) / sqrt(n)``, inflated
        about 5x at small lam). se = sd(psi) / sqrt(n) over the counted particles.
        """
        lam = jnp.asarray(lam)
        x = lam[..., None] * _lift(self.c, lam)
        mask = jnp.broadcast_to(_lift(self.w, lam), x.shape)
        xm = jnp.where(mask, x, -jnp.inf)
        e = jnp.where(mask, jnp.exp(xm - jnp.max(xm, axis=-1, keepdims=True)), 0.0)
        n = self.n
        psi = jnp.where(mask, e / (jnp.sum(e, -1, keepdims=True) / n) - x, 0.0)
        mean = jnp.sum(psi, -1, keepdims=True) / n
        var = jnp.sum(jnp.where(mask, (psi - mean) ** 2, 0.0), -1) / jnp.maximum(n - 1, 1)
        return jnp.sqrt(var / n)

    def grid(self, sign: int = 1) -> tuple[jax.Array, jax.Array]:
        """SPEC §5 grid ``(64,)`` and the mask of its points within the ESS range."""
        g = _base_grid(self.scale)
        return g, g <= (self.lam_sup if sign > 0 else self.eta_sup)


@jax.jit
def empirical(g, w, ess_fraction) -> EmpiricalCGF:
    """Empirical CGF of ONE dataset from gaps ``g`` ``(N,)`` and a mask ``w`` ``(N,)``
    of the particles that count (``jax.vmap`` it over datasets)."""
    g = jnp.asarray(g, jnp.float64)
    w = jnp.asarray(w, bool)
    n = w.sum()
    mean = jnp.sum(jnp.where(w, g, 0.0)) / n
    c = jnp.where(w, g - mean, 0.0)
    var = jnp.sum(c * c) / (n - 1)
    part = EmpiricalCGF(c, w, jnp.inf, jnp.inf, var)
    base = _base_grid(part.scale)
    sup = lambda s: jnp.max(jnp.where(part.ess(s * base) >= ess_fraction * n, base, 0.0))
    return part._replace(lam_sup=sup(1.0), eta_sup=sup(-1.0))


@jax.jit
def empirical_batch(g, w, ess_fraction) -> EmpiricalCGF:
    """:func:`empirical` for every dataset: ``g``, ``w`` ``(E, N)``."""
    # datasets in batches: the ESS grid holds 2 x 64 x N numbers per dataset
    batch = max(1, min(g.shape[0], POOLED_BLOCK_ELEMENTS // (2 * GRID_SIZE * g.shape[1])))
    return jax.lax.map(lambda a: empirical.__wrapped__(*a, ess_fraction), (g, w), batch_size=batch)


def effective_sample_size(g, lam) -> jax.Array:
    """ESS of the weights ``exp(lam g)`` for all particles ``g`` ``(N,)``, ``lam`` ``(L,)``."""
    g = jnp.asarray(g, jnp.float64)
    lam = jnp.asarray(lam, jnp.float64)
    x = lam[..., None] * _lift(g - jnp.mean(g), lam)
    return jnp.exp(2 * jax.nn.logsumexp(x, axis=-1) - jax.nn.logsumexp(2 * x, axis=-1))


class PooledCGF(NamedTuple):
    """``E_D Lambda_D`` over the datasets marked in ``used``, as one CGF (domain: the
    intersection): ``members`` is a batch ``[E, ...]`` of one kind."""

    members: ExactCGF | EmpiricalCGF
    used: jax.Array     # (E,) bool

    @property
    def kind(self) -> str:
        return self.members.kind

    def _mean(self, per):            # per: (E, ...) -> mean over used datasets
        u = self.used.reshape(self.used.shape + (1,) * (per.ndim - 1))
        return jnp.sum(jnp.where(u, per, 0.0), axis=0) / self.used.sum()

    def _over(self, method, lam):
        # members in batches: a pooled Lambda grid over many datasets of many particles
        # would otherwise hold E x lams x N numbers at once
        leaf = self.members.c if self.kind == "empirical" else self.members.kappa
        E, N = leaf.shape[0], leaf.shape[-1]
        batch = max(1, min(E, POOLED_BLOCK_ELEMENTS // (max(1, jnp.size(lam)) * N)))
        return jax.lax.map(lambda m: getattr(m, method)(lam), self.members, batch_size=batch)

    def fn(self, lam):
        return self._mean(self._over("fn", lam))

    def ratio(self, lam):
        return self._mean(self._over("ratio", lam))

    def se(self, lam):
        s2 = self._mean(self._over("se", lam) ** 2)
        return jnp.sqrt(s2 / self.used.sum())

    def _min(self, x):
        return jnp.min(jnp.where(self.used, x, jnp.inf))

    @property
    def lam_sup(self):
        return self._min(self.members.lam_sup)

    @property
    def eta_sup(self):
        return self._min(self.members.eta_sup)

    @property
    def variance(self):
        return self._mean(self.members.variance)

    @property
    def kappa_max(self):
        return -self._min(-self.members.kappa_max)

    @property
    def kappa_min(self):
        return self._min(self.members.kappa_min)

    @property
    def scale(self):
        return jnp.sqrt(jnp.maximum(self.variance, 1e-300))

    def grid(self, sign: int = 1):
        g = _base_grid(self.scale)
        sup = self.lam_sup if sign > 0 else self.eta_sup
        if self.kind == "exact":
            return g, g < (1 - 1e-3) * sup
        return g, g <= sup
