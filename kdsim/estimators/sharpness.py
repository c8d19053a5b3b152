"""Sharpness by Hessian-vector products through JAX autodiff (SPEC §5).

Generic: ``f`` is any scalar function of a parameter pytree (a training loss, a gap);
nothing here knows the model. Everything is written for ONE parameter point and one
key; vmap over datasets and particles outside. Run under ``jax.enable_x64`` with
float64 inputs for reference-quality numbers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .. import streams

PyTree = object


def _flat(f: Callable, w: PyTree):
    flat, unravel = ravel_pytree(w)
    return (lambda v: f(unravel(v))), flat


def hvp(f: Callable, w: jax.Array, v: jax.Array) -> jax.Array:
    """Hessian-vector product of ``f`` at flat ``w`` (forward-over-reverse)."""
    return jax.jvp(jax.grad(f), (w,), (v,))[1]


class PowerResult(NamedTuple):
    eigenvalue: jax.Array   # [] Rayleigh quotient (signed)
    magnitude: jax.Array    # [] ||H v|| for the final unit v: largest |eigenvalue|
    vector: jax.Array       # (p,) unit eigenvector estimate


def _power(matvec: Callable, v0: jax.Array, num_iters: int) -> PowerResult:
    def body(v, _):
        hv = matvec(v)
        return hv / jnp.maximum(jnp.linalg.norm(hv), 1e-300), None

    v = v0 / jnp.linalg.norm(v0)
    v, _ = jax.lax.scan(body, v, None, length=num_iters)
    hv = matvec(v)
    return PowerResult(jnp.vdot(v, hv), jnp.linalg.norm(hv), v)


def largest_abs_eigenvalue(f: Callable, w: PyTree, key: jax.Array | None = None,
                           num_iters: int = 200, v0: jax.Array | None = None) -> jax.Array:
    """``max_i |lambda_i(Hess f(w))|`` by power iteration on HVPs.

    The start vector is ``v0`` (flat, ``(p,)``) if given, else a normal draw from ``key``.
    """
    ff, flat = _flat(f, w)
    if v0 is None:
        v0 = streams.normal(key, flat.shape, flat.dtype)
    return _power(lambda v: hvp(ff, flat, v), v0, num_iters).magnitude


def top_eigenvalue(f: Callable, w: PyTree, key: jax.Array | None = None, num_iters: int = 200,
                   v0: jax.Array | None = None) -> jax.Array:
    """Largest (algebraic) Hessian eigenvalue: power iteration, shifted if the dominant one
    is negative. ``v0``: ``(2, p)`` start vectors of the two passes (else drawn from ``key``)."""
    ff, flat = _flat(f, w)
    if v0 is None:
        v0 = streams.normal(key, (2,) + flat.shape, flat.dtype)
    mv = lambda v: hvp(ff, flat, v)
    first = _power(mv, v0[0], num_iters)
    shift = jnp.minimum(first.eigenvalue, 0.0)
    shifted = _power(lambda v: mv(v) - shift * v, v0[1], num_iters)
    return jnp.where(first.eigenvalue >= 0, first.eigenvalue, shifted.eigenvalue + shift)


def hessian_eigenvalues(f: Callable, w: PyTree) -> jax.Array:
    """All eigenvalues (ascending, ``(p,)``) of the Hessian of ``f`` at ``w``, built from
    p Hessian-vector products (one batched product: forward over reverse).

    For small p this is exact and cheaper than power iteration, whose steps are
    sequential: :data:`DENSE_MAX` is where :func:`kdsim.evaluation` switches.
    """
    ff, flat = _flat(f, w)
    H = jax.vmap(lambda v: hvp(ff, flat, v))(jnp.eye(flat.shape[0], dtype=flat.dtype))
    return jnp.linalg.eigvalsh(0.5 * (H + H.T))


DENSE_MAX = 64   # parameters up to which the Hessian's eigenvalues come from the full matrix


def hutchinson_trace(f: Callable, w: PyTree, key: jax.Array | None = None, num_probes: int = 128,
                     probes: jax.Array | None = None):
    """Hutchinson trace ``E[z^T H z]`` with Rademacher probes ``(num_probes, p)``
    (given, or drawn from ``key``): (mean, standard error)."""
    ff, flat = _flat(f, w)
    if probes is None:
        probes = streams.rademacher(key, (num_probes,) + flat.shape, flat.dtype)
    q = jax.vmap(lambda v: jnp.vdot(v, hvp(ff, flat, v)))(probes)
    return q.mean(), q.std(ddof=1) / jnp.sqrt(q.shape[0])


def gradient_norm(f: Callable, w: PyTree) -> jax.Array:
    ff, flat = _flat(f, w)
    return jnp.linalg.norm(jax.grad(ff)(flat))


def sam_sharpness(f: Callable, w: PyTree, rho: jax.Array) -> jax.Array:
    """SAM sharpness ``max_{||e|| <= rho} f(w + e) - f(w)`` by one normalised ascent step."""
    ff, flat = _flat(f, w)
    g = jax.grad(ff)(flat)
    e = rho * g / jnp.maximum(jnp.linalg.norm(g), 1e-300)
    return ff(flat + e) - ff(flat)


def laplace_hessian(particles: jax.Array, gamma: float, prior_scale: float) -> jax.Array:
    """Hessian of the training loss implied by the particle covariance (Laplace).

    ``Cov ~ (gamma H + I / s0^2)^{-1}``, so ``H ~ (Cov^{-1} - I / s0^2) / gamma``.
    Args:
      particles: ``(P, p)`` flattened parameters, ``P > p``.
    Returns:
      ``(p, p)``.
    """
    P, p = particles.shape
    c = particles - particles.mean(axis=0, keepdims=True)
    cov = c.T @ c / (P - 1)
    return (jnp.linalg.inv(cov) - jnp.eye(p, dtype=cov.dtype) / prior_scale**2) / gamma
