"""Predictive-space estimators from coupled teacher/student pairs (SPEC §3, §5).

For ONE dataset; the caller loops or vmaps over datasets. Pairs are rows of the
particle arrays: student ``i`` was distilled from teacher ``i``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import closed_form
from ..stats import (jackknife_combine, jackknife_combine_rows, jackknife_group_masks,
                     jackknife_masks, mean_se)


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


def convexity_pairs(W_S: np.ndarray, W_T: np.ndarray, G: np.ndarray, channel_noise: float) -> np.ndarray:
    """Per pair ``||(W_S - W_T) Xe^T||_F^2 / (2 nu_p^2)``: ``(E, P, k, d)`` pairs and Grams
    ``G`` ``(E, d, d)`` -> ``(E, P)`` (:func:`convexity_bound` is its mean over pairs)."""
    D = W_S - W_T
    return np.einsum("epki,eij,epkj->ep", D, G, D) / (2.0 * channel_noise**2)


def decomposition_batch(W_S: np.ndarray, W_T: np.ndarray, G: np.ndarray, Pi: np.ndarray, rank: int,
                        keep: np.ndarray, num_groups: int = 32
                        ) -> tuple[closed_form.Decomposition, closed_form.Decomposition]:
    """:func:`decomposition` of every dataset at once over the pairs in ``keep``.

    Args:
      W_S, W_T: ``(E, P, k, d)``; G: ``(E, d, d)``; Pi: ``(E, d, r)``; keep: ``(E, P)``.
    Returns:
      ``(values, standard_errors)``, ``(E,)`` in each field (NaN for a dataset with fewer
      than 2 pairs kept).
    """
    E, P = keep.shape
    masks, Gn = jackknife_group_masks(keep, num_groups)                # (E, M, P), M = G_max + 1
    M = masks.shape[1]
    n = masks.sum(-1).astype(np.float64)                               # (E, M)
    w = masks / np.maximum(n, 1)[..., None]
    M_T = np.einsum("emp,epki->emki", w, W_T)
    M_S = np.einsum("emp,epki->emki", w, W_S)
    flat = lambda a: a.reshape((E * M,) + a.shape[2:])
    rep = lambda a: np.repeat(a, M, axis=0)
    bias, subspace, rank_cost = (x.reshape(E, M) for x in closed_form.mean_terms(
        flat(M_T), flat(M_S), rep(G), rep(Pi), rank))
    # variance of the pair differences per mask, from sums of the differences centred at
    # the full-sample mean (no (E, M, P, k, d) array)
    D = W_S - W_T
    Dc = D - (M_S - M_T)[:, :1]
    q = np.einsum("epki,eij,epkj->ep", Dc, G, Dc)
    dm = (M_S - M_T) - (M_S - M_T)[:, :1]                              # mask mean - full mean
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = (np.einsum("emp,ep->em", masks, q)
                    - n * np.einsum("emki,eij,emkj->em", dm, G, dm)) / (n - 1)
    theta = np.stack([bias, subspace, rank_cost, variance], axis=-1)  # (E, M, 4)
    jack, se = jackknife_combine_rows(theta, Gn)
    few = keep.sum(1) < 2
    jack, se = (np.where(few[:, None], np.nan, a) for a in (jack, se))
    return closed_form.Decomposition(*jack.T), closed_form.Decomposition(*se.T)
