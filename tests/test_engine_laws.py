"""SPEC §8 oracle: the populations reproduce the finite-time laws, by z-score at fixed seeds.

For every (student rank, alpha, nu_T) case the Monte Carlo means, covariances, the pair
cross-covariance, the gaps, the convexity bound and the decomposition's Monte Carlo
counterpart are compared with the `finite_time` closed forms. Multivariate checks are
exact chi-square statistics (Mahalanobis distance of the mean; whitened sample
covariance of the joint teacher/student row), turned into one-sided z-scores; all
z-scores of a case must stay within the Bonferroni limit at family-wise level 1e-3.
Under step-size schedules the laws iterate the engine's h_t.
"""

import numpy as np
import pytest
from scipy import stats as sps

import kdsim
from kdsim import closed_form, evaluation, run_populations
from kdsim.config import SimConfig, resolve
from kdsim.stats import bonferroni_z

from helpers import assert_never_flagged, config, z_from_p, z_spread_ok


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
    signed = []  # the signed z-scores of the Monte Carlo estimates, for the spread check
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
            signed.append((df[mc][e] - df[exact][e]) / df[se][e])
            zs[f"{mc}[{e}]"] = abs(signed[-1])

    limit = bonferroni_z(len(zs))
    worst = max(zs, key=zs.get)
    assert zs[worst] <= limit, f"{worst}: z = {zs[worst]:.2f} > {limit:.2f}"
    # not vacuous: the standard errors are not inflated (sum z^2 ~ chi2 over the cells;
    # standard errors 2x too large would make it 4x too small)
    ok, stat, low = z_spread_ok(signed)
    assert ok, f"sum z^2 = {stat:.2f} < {low:.2f} over {len(signed)} cells: inflated standard errors"


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


@pytest.mark.parametrize("schedule", ["polynomial", "cosine"])
def test_linear_closed_forms_follow_the_schedule(schedule):
    """Under a schedule the finite-time laws iterate the engine's h_t: the teacher
    population's per-coordinate means and variances match them by z-score, and differ
    from the constant-step laws by many standard errors."""
    over = {"teacher.schedule": schedule, "teacher.schedule_offset": 5.0, "teacher.num_steps": 60,
            "teacher.step_size": 0.02, "task.d": 3, "task.k": 1, "task.n": 16, "num_datasets": 2,
            "num_particles": 2000}
    cfg = SimConfig.from_dict({}).replace(over)
    run = kdsim.run_populations(cfg)
    res = resolve(cfg)
    laws = closed_form.finite_time(run.data, res.static, res.numeric)
    const = closed_form.finite_time(run.data, resolve(cfg.replace({"teacher.schedule": "constant"})).static,
                                    res.numeric)
    W = run.populations.teacher.astype(np.float64)[:, :, 0]            # (E, P, d)
    P = W.shape[1]
    m, v = W.mean(1), W.var(1, ddof=1)
    sd_m = np.sqrt(np.diagonal(laws.Sigma_T, axis1=1, axis2=2) / P)
    var = np.diagonal(laws.Sigma_T, axis1=1, axis2=2)
    z = np.concatenate([((m - laws.M_T[:, 0]) / sd_m).ravel(), ((v - var) / (var * np.sqrt(2 / (P - 1)))).ravel()])
    assert np.max(np.abs(z)) < bonferroni_z(z.size)
    # the schedule matters: the constant-step law is far off, by the same yardstick
    z_const = ((v - np.diagonal(const.Sigma_T, axis1=1, axis2=2)) / (var * np.sqrt(2 / (P - 1)))).ravel()
    assert np.max(np.abs(z_const)) > 3 * bonferroni_z(z.size)
