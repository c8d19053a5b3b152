"""SPEC §8 oracle: the populations reproduce the finite-time laws, by z-score at fixed seeds.

For every (student rank, alpha, nu_T) case the Monte Carlo means, covariances, the pair
cross-covariance, the gaps, the convexity bound and the decomposition's Monte Carlo
counterpart are compared with the `finite_time` closed forms. Multivariate checks are
exact chi-square statistics (Mahalanobis distance of the mean; whitened sample
covariance of the joint teacher/student row), turned into one-sided z-scores; all
z-scores of a case must stay within the Bonferroni limit at family-wise level 1e-3.
"""

import numpy as np
import pytest
from scipy import stats as sps

from kdsim import closed_form, run_populations
from kdsim.config import resolve
from kdsim import evaluation
from kdsim.stats import bonferroni_z

from helpers import assert_never_flagged, config, z_from_p

CASES = [(r, a, nu) for r in (None, 2) for a in (0.0, 0.3, 1.0) for nu in (0.0, 0.5)
         if not (a == 1.0 and nu == 0.5)]
P = 3000
E = 4


def _mean_chi2(samples, mean, cov):
    """Sum over rows j of P (xbar_j - m_j)^T cov^{-1} (xbar_j - m_j) ~ chi2(k * dim)."""
    n = samples.shape[0]
    diff = samples.mean(axis=0) - mean                       # (k, dim)
    stat = n * np.einsum("ki,ij,kj->", diff, np.linalg.inv(cov), diff)
    return z_from_p(sps.chi2.sf(stat, diff.size))


def _cov_chi2(samples, mean, cov):
    """Whitened sample covariance (known means), pooled over the k rows.

    With N = P k rows, L^{-1} S L^{-T} has uncorrelated entries of variance 2/N on the
    diagonal and 1/N off it; the sum of squared standardised upper-triangle entries is
    approximately chi2(q (q + 1) / 2).
    """
    n, k, q = samples.shape
    centred = (samples - mean).reshape(n * k, q)
    L = np.linalg.cholesky(cov)
    white = np.linalg.solve(L, centred.T).T
    S = white.T @ white / (n * k)
    iu = np.triu_indices(q)
    z = (S - np.eye(q))[iu] * np.sqrt(n * k / np.where(iu[0] == iu[1], 2.0, 1.0))
    return z_from_p(sps.chi2.sf(np.sum(z**2), z.size))


@pytest.mark.parametrize("rank, alpha, nu", CASES, ids=lambda v: str(v))
def test_populations_match_finite_time_laws(rank, alpha, nu):
    cfg = config(**{"student.rank": rank, "student.alpha": alpha, "student.teacher_noise": nu,
                    "num_datasets": E, "num_particles": P, "seed": 11})
    run = run_populations(cfg)
    assert_never_flagged(run)       # the escape test never fires on these healthy chains
    res = resolve(cfg)
    laws = closed_form.finite_time(run.data, res.static, res.numeric)
    pops = run.populations
    assert not pops.diverged_T.any() and not pops.diverged_S.any()
    W_T = pops.teacher.astype(np.float64)
    V = pops.student_sub.astype(np.float64)
    zs = {}  # name -> one-sided (chi-square) or absolute two-sided z-score
    for e in range(E):
        zs[f"mean_T[{e}]"] = _mean_chi2(W_T[e], laws.M_T[e], laws.Sigma_T[e])
        zs[f"mean_S[{e}]"] = _mean_chi2(V[e], laws.M_V[e], laws.Sigma_V[e])
        joint = np.concatenate([W_T[e], V[e]], axis=-1)                # (P, k, d + r)
        joint_mean = np.concatenate([laws.M_T[e], laws.M_V[e]], axis=-1)
        joint_cov = np.block([[laws.Sigma_T[e], laws.C_V[e].T], [laws.C_V[e], laws.Sigma_V[e]]])
        zs[f"cov_joint[{e}]"] = _cov_chi2(joint, joint_mean, joint_cov)

    ctx, _, _ = evaluation.context(run)
    df = {**evaluation.closed_form_columns(ctx)[0], **evaluation.monte_carlo_columns(ctx)[0]}
    pairs = [("gen_T", "gen_T_se", "gen_T_exact"), ("gen_S", "gen_S_se", "gen_S_exact"),
             ("klpred_convexity", "klpred_convexity_se", "klpred_convexity_exact")]
    for term in ("bias", "subspace", "rank", "variance"):
        pairs.append((f"decomp_{term}_mc", f"decomp_{term}_mc_se", f"decomp_{term}"))
    for mc, se, exact in pairs:
        for e in range(E):
            if df[se][e] == 0 and df[exact][e] == 0:   # structurally zero (full student)
                assert df[mc][e] == 0
                continue
            zs[f"{mc}[{e}]"] = abs(df[mc][e] - df[exact][e]) / df[se][e]

    limit = bonferroni_z(len(zs))
    worst = max(zs, key=zs.get)
    assert zs[worst] <= limit, f"{worst}: z = {zs[worst]:.2f} > {limit:.2f}"
    # not vacuous: the checks must see real Monte Carlo noise, not degenerate zeros
    assert np.median(list(zs.values())) > 0.05


def test_a_wrong_law_is_detected():
    """The same statistics reject the laws of a chain that ran one student step short."""
    cfg = config(**{"student.alpha": 0.3, "num_datasets": E, "num_particles": P, "seed": 11})
    run = run_populations(cfg)
    wrong = cfg.replace({"student.langevin.num_steps": cfg.student.langevin.num_steps - 5})
    res = resolve(wrong)
    laws = closed_form.finite_time(run.data, res.static, res.numeric)
    V = run.populations.student_sub.astype(np.float64)
    zs = [_mean_chi2(V[e], laws.M_V[e], laws.Sigma_V[e]) for e in range(E)]
    zs += [_cov_chi2(V[e], laws.M_V[e], laws.Sigma_V[e]) for e in range(E)]
    assert max(zs) > bonferroni_z(len(zs)) + 2
