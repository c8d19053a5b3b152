"""A KD reference inside the student's class: the ``*_proj`` bounds (SPEC §10, last part).

Donsker--Varadhan holds for ANY reference kernel ``P'``, not only the teacher:

.. math:: \\mathrm{gen}_S(D) \\le \\mathrm{gen}_{P'}(D)
          + \\min_{\\lambda > 0} \\frac{KL(Q \\| P') + \\Lambda'_D(\\lambda)}{\\lambda}.

With ``P'`` = the teacher, a rank-r linear student pays the whole subspace and rank costs
in KL (infinite in parameter space). Here ``P'`` is the law of the teacher projected on
the student's subspace, ``W_T Pi Pi^T`` (a fixed map of the teacher given D): Gaussian
on the same r-dimensional coordinates as the student ``W_S = V Pi^T``, so ``KL(Q || P')``
is finite. On the linear task everything is a closed form (float64): the reference's
law ``rows ~ N(M_T Pi Pi^T, Pi Pi^T Sigma_T Pi Pi^T)``, its expected gap, its exact CGF
(:func:`kdsim.estimators.cgf.exact_terms` with the projected law), the Gaussian KL in the
student's coordinates; the bound is exact up to the lambda optimisation.

Pure array functions of the laws; the evaluation pipeline can call
:func:`projected_reference` with the finite-time (or stationary) laws of a run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import bounds, closed_form
from .estimators import cgf as cgf_mod
from .tasks.linear_gaussian import LinearData


class ProjectedReference(NamedTuple):
    """Per dataset ``(E,)`` unless said otherwise."""

    kl: np.ndarray          # KL(Q || P') over the k rows, in the student's coordinates
    gen_ref: np.ndarray     # E g_D under P' (closed form)
    B0_upper: np.ndarray    # gen_ref + min_lam (kl + Lambda'(lam)) / lam
    truth: np.ndarray       # gen_S of the same laws
    pooled_B0_upper: float  # E gen_ref + min_lam (mean kl + mean Lambda'(lam)) / lam
    pooled_truth: float


def gaussian_kl_rows(M1: np.ndarray, S1: np.ndarray, M0: np.ndarray, S0: np.ndarray) -> np.ndarray:
    """``KL(N(M1, S1) || N(M0, S0))`` for k independent rows sharing a row covariance:
    M ``(E, k, r)``, S ``(E, r, r)`` -> ``(E,)``.

    .. math:: \\tfrac{k}{2}[\\mathrm{tr}(S_0^{-1}S_1) - r - \\log\\det(S_0^{-1}S_1)]
              + \\tfrac12 \\mathrm{tr}((M_1-M_0) S_0^{-1} (M_1-M_0)^T)
    """
    k, r = M1.shape[-2:]
    tr = np.trace(np.linalg.solve(S0, S1), axis1=-2, axis2=-1)
    logdet = np.linalg.slogdet(S1)[1] - np.linalg.slogdet(S0)[1]
    delta = M1 - M0
    maha = np.einsum("eki,eki->e", delta, np.swapaxes(np.linalg.solve(S0, np.swapaxes(delta, -1, -2)), -1, -2))
    return 0.5 * k * (tr - r - logdet) + 0.5 * maha


@jax.jit
def _dv(members: cgf_mod.ExactCGF, kl: jax.Array, used: jax.Array):
    """Per-dataset and pooled ``min_lam (KL + Lambda(lam)) / lam`` (one program); the
    pooled form averages the datasets marked in ``used`` (the others are padding)."""
    per, _ = jax.vmap(lambda c, x: bounds.dv_excess(x, c))(members, kl)
    pooled = cgf_mod.PooledCGF(members, used)
    return per, bounds.dv_excess(jnp.sum(jnp.where(used, kl, 0.0)) / used.sum(), pooled)[0]


def _padded(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` along its first axis padded to ``size`` with copies of its first entry, so
    runs of similar sizes share one compiled program."""
    a = np.asarray(a)
    return np.concatenate([a, np.repeat(a[:1], size - a.shape[0], axis=0)])


def projected_reference(laws: closed_form.GaussianLaws, data: LinearData) -> ProjectedReference:
    """The ``*_proj`` bound of a rank-r (or full) linear student with the teacher projected
    on the student's subspace as reference, per dataset and pooled over datasets."""
    Pi = data.Pi                                                     # (E, d, r)
    PiT = np.swapaxes(Pi, -1, -2)
    proj = Pi @ PiT
    M_ref = laws.M_T @ proj                                          # (E, k, d)
    S_ref = proj @ laws.Sigma_T @ proj                               # (E, d, d), rank r
    # the reference and the student in the student's own r coordinates
    kl = gaussian_kl_rows(laws.M_V, laws.Sigma_V, laws.M_T @ Pi, PiT @ laws.Sigma_T @ Pi)
    pop, emp = closed_form.expected_risks(M_ref, S_ref, data)
    gen_ref = pop - emp
    truth = closed_form.expected_gaps(laws, data)[1]
    k = laws.M_T.shape[-2]
    kappa, A = cgf_mod.exact_terms(M_ref, S_ref, data.Cxx, data.Cyx, data.W_star, data.sx)
    members = cgf_mod.exact(kappa, A, k)
    E = kl.shape[0]
    size = max(8, 1 << max(0, E - 1).bit_length())      # power-of-two buckets
    with jax.enable_x64(True):
        excess, pooled_excess = jax.device_get(_dv(
            jax.tree_util.tree_map(lambda a: jnp.asarray(_padded(a, size)), members),
            jnp.asarray(_padded(kl, size)), jnp.arange(size) < E))
    excess = np.asarray(excess, np.float64)[:E]
    return ProjectedReference(kl=kl, gen_ref=gen_ref, B0_upper=gen_ref + excess, truth=truth,
                              pooled_B0_upper=float(gen_ref.mean() + float(pooled_excess)),
                              pooled_truth=float(truth.mean()))
