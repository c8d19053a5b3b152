"""Predictive-space estimators from coupled teacher/student pairs (SPEC §3, §5).

For ONE dataset; the caller loops or vmaps over datasets. Pairs are rows of the
particle arrays: student ``i`` was distilled from teacher ``i``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import closed_form
from ..stats import jackknife_combine, jackknife_masks, mean_se


class Estimate(NamedTuple):
    value: np.ndarray
    se: np.ndarray


def convexity_bound(W_S: np.ndarray, W_T: np.ndarray, G: np.ndarray, channel_noise: float) -> Estimate:
    """``E ||(W_S - W_T) Xe^T||_F^2 / (2 nu_p^2)`` over the coupled pairs.

    Args:
      W_S, W_T: ``(P, k, d)`` paired student and teacher parameters.
      G: ``(d, d)`` Gram matrix ``Xe^T Xe`` of the evaluation inputs.
    Returns:
      the pair average and its standard error (scalars).
    """
    D = W_S - W_T
    q = np.einsum("pki,ij,pkj->p", D, G, D) / (2.0 * channel_noise**2)
    m, se = mean_se(q)
    return Estimate(m, se)


def decomposition(W_S: np.ndarray, W_T: np.ndarray, G: np.ndarray, Pi: np.ndarray, rank: int,
                  num_groups: int = 32) -> tuple[closed_form.Decomposition, closed_form.Decomposition]:
    """Monte Carlo decomposition (bias, subspace, rank, variance) from the pairs.

    Plug-in values (particle means in the mean terms, the pair-difference covariance in
    the variance term) carry an O(1/P) bias; a delete-a-group jackknife removes it and
    gives standard errors.

    Args:
      W_S, W_T: ``(P, k, d)``; G: ``(d, d)``; Pi: ``(d, r)`` the student's subspace.
    Returns:
      ``(values, standard_errors)``, scalars in each field.
    """
    masks = jackknife_masks(W_S.shape[0], num_groups)
    Gn = masks.shape[0] - 1
    w = masks / masks.sum(axis=1, keepdims=True)                   # (G+1, P)
    M_T = np.einsum("gp,pki->gki", w, W_T)
    M_S = np.einsum("gp,pki->gki", w, W_S)
    Gb = np.broadcast_to(G, (Gn + 1,) + G.shape)
    Pib = np.broadcast_to(Pi, (Gn + 1,) + Pi.shape)
    bias, subspace, rank_cost = closed_form.mean_terms(M_T, M_S, Gb, Pib, rank)
    D = W_S - W_T
    Dbar = M_S - M_T
    centred = D[None] - Dbar[:, None]                               # (G+1, P, k, d)
    sq = np.einsum("gpki,ij,gpkj->gp", centred, G, centred)
    counts = masks.sum(axis=1)
    variance = (sq * masks).sum(axis=1) / (counts - 1)
    theta = np.stack([bias, subspace, rank_cost, variance], axis=-1)  # (G+1, 4)
    jack, se = jackknife_combine(theta)
    return closed_form.Decomposition(*jack), closed_form.Decomposition(*se)
