"""The field's generic bounds on the expected gap, and kdsim's KD split (SPEC §10).

Pure functions of arrays (float64 NumPy): they know nothing of configs or tables.
Every bound here bounds ``E_D gen(D)``, the gap averaged over datasets, of a loss in
``[0, B]`` (``B`` = ``loss_bound``), so the inputs are averages over datasets.

Trajectory bounds. kdsim's Langevin step ``w <- w - h grad U(w) + sqrt(2h) xi`` with
``U = gamma Lhat + prior``; per dataset the engine accumulates (:mod:`kdsim.trajectory`)

- ``loo = sum_t (h_t gamma^2/4) E_J E ||g_J - gbar||^2 / (n-1)^2``, the path KL between the
  run on D and the same run on ``D without z_J`` (the leave-one-out prior), and
- ``zero = sum_t (h_t gamma^2/4) E_J E ||g_J||^2 / n^2``, the path KL to the run in which
  z_J is replaced by a point of zero loss (Li, Luo & Qiao's prior process),

with ``g_i`` the per-example gradients of the phase's training objective at the pre-step
state (chain rule for path KLs: Li, Luo & Qiao 2020, Lemma 10).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def subgaussian_sigma(loss_bound: float) -> float:
    """A loss in ``[0, B]`` is ``B/2``-sub-Gaussian about its mean (Hoeffding's lemma)."""
    return 0.5 * float(loss_bound)


def incoherence_bound(kl_loo: np.ndarray, loss_bound: float) -> np.ndarray:
    """Leave-one-out incoherence bound (Negrea, Haghifam, Dziugaite, Khisti & Roy,
    "Information-Theoretic Generalization Bounds for SGLD via Data-Dependent Estimates",
    NeurIPS 2019): with J uniform on [n] independent of everything, a prior that sees
    ``D without z_J`` (their ``n - m = 1`` held-out point) and a ``sigma``-sub-Gaussian loss,

    .. math:: E_D\\, \\mathrm{gen}(D) \\le \\sqrt{2 \\sigma^2\\, E_{D,J} \\mathrm{KL}(P_{W|D} \\| P_{W|D_{-J}})}

    (decoupling by Donsker--Varadhan conditionally on ``D_{-J}``, then Jensen), and the
    output KL is at most the path KL ``kl_loo`` (data processing).

    The constant agrees with the authors' own code for full-batch Langevin dynamics
    (github.com/mhaghifam/sgld-genbound-NeurIPS2020, ``mnist_mlp_bounds.py``: the 0-1
    loss, ``(1 / (2 sqrt 2)) sqrt(sum_t beta_t eta_t ||incoherence_t||^2)`` with the
    incoherence ``(grad_{D without J} - grad_J) / n`` = kdsim's ``delta`` and
    ``beta_t eta_t`` = kdsim's ``h gamma^2``: that is ``sqrt(KL / 2)``, ours at B = 1).

    Args:
      kl_loo: the dataset-averaged path KL ``E_D[loo]`` (any shape; elementwise).
      loss_bound: B, the loss lies in ``[0, B]`` (sigma = B/2).
    Returns:
      the bound on the expected gap, same shape.
    """
    sigma = subgaussian_sigma(loss_bound)
    return np.sqrt(2.0 * sigma**2 * np.maximum(np.asarray(kl_loo, np.float64), 0.0))


def bayes_stability_bound(kl_zero: np.ndarray, loss_bound: float) -> np.ndarray:
    """Bayes-stability bound (Li, Luo & Qiao, "On Generalization Error Bounds of Noisy
    Gradient Methods for Non-Convex Learning", ICLR 2020, Theorem 9, full-batch GLD):

    .. math:: \\mathrm{err}_{gen} \\le \\frac{2\\sqrt2\\, C}{n}
              \\sqrt{E_S \\sum_{t=1}^T \\frac{\\gamma_t^2}{\\sigma_t^2} g_e(t)},\\qquad
              g_e(t) = E_{w \\sim W_{t-1}} \\tfrac1n \\sum_i \\|\\nabla F(w, z_i)\\|^2,

    for ``W_t = W_{t-1} - gamma_t grad F(W_{t-1}, S) + (sigma_t/sqrt 2) N(0, I)`` and a loss
    in ``[0, C]``. In kdsim's step the data part of ``gamma_t grad F`` is ``h gamma grad l``
    and ``sigma_t^2 / 2 = 2h``, so ``gamma_t^2/sigma_t^2 ||grad F||^2 = (h gamma^2/4) ||grad l||^2``
    and the bound reads ``2 sqrt(2) C sqrt(E_D[zero])`` with ``zero`` (module docstring)
    already divided by ``n^2``. The prior term of the energy is data-independent, so the
    prior process keeps it (Theorem 7 holds for any data-free prior process; the per-step
    KL then involves only the data gradient of z).

    The same repository's gradient-norm estimate, ``(sqrt 2 / n) sqrt(sum_t eta_t beta_t
    E ||grad l||^2)``, is this bound at C = 1.

    Args:
      kl_zero: ``E_D[zero]``; loss_bound: C.
    """
    return 2.0 * np.sqrt(2.0) * float(loss_bound) * np.sqrt(
        np.maximum(np.asarray(kl_zero, np.float64), 0.0))


def kd_split_bound(kl_teacher: np.ndarray, kl_student: np.ndarray, loss_bound: float) -> np.ndarray:
    """kdsim's KD split (SPEC §10): the leave-one-out bound of :func:`incoherence_bound`
    for the pair ``(W_T, W_S)``, whose prior process runs BOTH phases on
    ``D without z_J``. The chain rule for path KLs,
    ``KL(P_{T,S} || Q_{T,S}) = KL(P_T || Q_T) + E_{P_T} KL(P_{S|T} || Q_{S|T})``,
    splits it into the teacher phase's sum and the student phase's sum at the same
    partner, so it bounds the gap of any function of the pair (the student's loss of
    any architecture included): ``sqrt(2 sigma^2 E_D[loo_T + loo_S])``.
    """
    return incoherence_bound(np.asarray(kl_teacher, np.float64) + np.asarray(kl_student, np.float64),
                             loss_bound)


# ---------------------------------------------------------------------------------------
# The Gibbs identity (Aminian, Bu, Toni, Rodrigues & Wornell, "An Exact Characterization
# of the Generalization Error for the Gibbs Algorithm", NeurIPS 2021): for the Gibbs
# posterior P(w|D) ∝ pi(w) exp(-gamma Lhat_D(w)), gamma E_D gen(D) = I_SKL(W; D), and since
# the prior and the normaliser cancel, I_SKL = E_{D,D'} KL(P(.|D') || P(.|D)) over
# independent datasets.


def gaussian_pair_kls(M: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``KL(P_j || P_i)`` for every ordered pair of Gaussian row laws, ``(N, N)`` (entry
    ``[i, j]``), with ``P_e`` = k independent rows ``N(M_e row, A_e^{-1})``:

    .. math:: \\mathrm{KL}(P_j\\|P_i) = \\tfrac k2 [\\mathrm{tr}(A_i A_j^{-1}) - d - \\log\\det(A_i A_j^{-1})]
              + \\tfrac12 \\mathrm{tr}((M_j - M_i) A_i (M_j - M_i)^T).

    Args:
      M: ``(N, k, d)`` means; A: ``(N, d, d)`` precisions (SPD).
    """
    M, A = np.asarray(M, np.float64), np.asarray(A, np.float64)
    k, d = M.shape[-2:]
    cov = np.linalg.inv(A)
    logdet = np.linalg.slogdet(A)[1]
    trace = np.einsum("iab,jba->ij", A, cov)                       # tr(A_i A_j^{-1})
    quad_self = np.einsum("ika,iab,ikb->i", M, A, M)
    cross = np.einsum("jka,iab,ikb->ij", M, A, M)                  # tr(M_j A_i M_i^T)
    quad_other = np.einsum("jka,iab,jkb->ij", M, A, M)             # tr(M_j A_i M_j^T)
    mean_term = quad_other - 2.0 * cross + quad_self[:, None]
    return 0.5 * k * (trace - d - (logdet[:, None] - logdet[None, :])) + 0.5 * mean_term


class PairMean(NamedTuple):
    value: float      # mean of the kernel over ordered pairs of distinct indices
    se: float         # its standard error (Hoeffding decomposition of a U-statistic)


def pair_mean(H: np.ndarray) -> PairMean:
    """Mean over ordered pairs ``i != j`` of ``H[i, j]`` and its standard error.

    The pair-mean of independent units is a U-statistic: with the symmetrised kernel
    ``h = (H + H^T)/2``, its projection ``h1(i) = mean_{j != i} h(i, j)`` and Hoeffding's
    decomposition, ``Var U = 4 (N-2)/(N(N-1)) zeta_1 + 2/(N(N-1)) zeta_2`` with
    ``zeta_1 = Var h1``, ``zeta_2 = Var h``. Both are estimated by their sample values
    (``zeta_1`` from the N projections, ddof 1; ``zeta_2`` from the off-diagonal pairs).
    Treating the N(N-1) pairs as independent would be far too small: every dataset
    appears in 2(N-1) of them.

    Args:
      H: ``(N, N)`` kernel values (the diagonal is ignored), N >= 3.
    """
    H = np.asarray(H, np.float64)
    N = H.shape[0]
    if N < 3:
        return PairMean(float("nan"), float("nan"))
    off = ~np.eye(N, dtype=bool)
    h = 0.5 * (H + H.T)
    U = float(H[off].mean())
    h1 = np.where(off, h, 0.0).sum(1) / (N - 1)
    zeta1 = float(np.var(h1, ddof=1))
    zeta2 = float(np.var(h[off], ddof=1))
    var = 4.0 * (N - 2) / (N * (N - 1)) * zeta1 + 2.0 / (N * (N - 1)) * zeta2
    return PairMean(U, float(np.sqrt(max(var, 0.0))))


class GibbsIdentity(NamedTuple):
    value: float      # mean pair KL / gamma
    value_se: float
    truth: float      # mean gen_T (stationary closed form)
    truth_se: float
    diff_se: float    # se of value - truth (one U-statistic: they share the datasets)


def gibbs_identity(M: np.ndarray, A: np.ndarray, gamma: float, gen: np.ndarray) -> GibbsIdentity:
    """Both sides of ``gamma E_D gen_T(D) = E_{D,D'} KL(P(.|D') || P(.|D))`` from N
    independent datasets' stationary Gibbs laws.

    Args:
      M: ``(N, k, d)`` stationary teacher means; A: ``(N, d, d)`` their precisions
        ``gamma Cxx + I/s0^2``; gamma: the teacher's inverse temperature;
      gen: ``(N,)`` the stationary expected gaps gen_T(D).
    Returns:
      value (pair-mean of KL / gamma), truth (mean gap), and the standard errors; the
      difference ``value - truth`` is the pair-mean of
      ``KL[i, j]/gamma - (gen_i + gen_j)/2``, whose U-statistic se is ``diff_se``.
    """
    gen = np.asarray(gen, np.float64)
    K = gaussian_pair_kls(M, A) / float(gamma)
    value = pair_mean(K)
    N = gen.shape[0]
    truth_se = float(np.std(gen, ddof=1) / np.sqrt(N)) if N > 1 else float("nan")
    diff = pair_mean(K - 0.5 * (gen[:, None] + gen[None, :]))
    return GibbsIdentity(value.value, value.se, float(gen.mean()), truth_se, diff.se)
