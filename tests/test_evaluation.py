"""The one evaluation pipeline (kdsim/evaluation.py): batched estimators against their
per-dataset definitions, the stage hook, and one compiled bound program per CGF kind."""

from pathlib import Path

import numpy as np

import kdsim
from kdsim import bound_tables, bounds, evaluation, stats
from kdsim.estimators import divergence, predictive


def _pairs(rng, E, P, p, drop=0.15):
    S = rng.normal(size=(E, P, p))
    T = 0.7 * S + 0.5 * rng.normal(size=(E, P, p)) + 0.2
    keep = rng.random((E, P)) > drop
    keep[0] = True                                   # one dataset with every pair
    return S, T, keep


def test_batched_estimators_equal_the_per_dataset_ones_on_the_kept_pairs():
    """Every dataset at once, with masks, equals the one-dataset estimator on the kept
    rows (jackknife groups included): no per-dataset loop changes a number."""
    rng = np.random.default_rng(0)
    E, P, p = 5, 70, 3
    S, T, keep = _pairs(rng, E, P, p)
    for batch, one in ((divergence.gaussian_full_batch, divergence.gaussian_full),
                       (divergence.gaussian_diag_batch, divergence.gaussian_diag),
                       (divergence.knn_batch, divergence.knn)):
        got = batch(S, T, keep)
        assert got.reason == ""
        for e in range(E):
            want = one(S[e, keep[e]], T[e, keep[e]])
            np.testing.assert_allclose([got.value[e], got.se[e]], [want.value, want.se], rtol=1e-9)
    mean, se = stats.masked_mean_se(S[..., 0], keep)
    for e in range(E):
        np.testing.assert_allclose([mean[e], se[e]], stats.mean_se(S[e, keep[e], 0]), rtol=1e-12)


def test_batched_decomposition_equals_the_per_dataset_jackknife():
    rng = np.random.default_rng(1)
    E, P, k, d, r = 4, 45, 2, 5, 3
    WS = rng.normal(size=(E, P, k, d))
    WT = 0.5 * WS + rng.normal(size=(E, P, k, d))
    X = rng.normal(size=(E, 20, d))
    G = np.einsum("eni,enj->eij", X, X)
    Pi = np.linalg.qr(rng.normal(size=(E, d, r)))[0]
    keep = rng.random((E, P)) > 0.2
    values, ses = predictive.decomposition_batch(WS, WT, G, Pi, r, keep)
    for e in range(E):
        v, s = predictive.decomposition(WS[e, keep[e]], WT[e, keep[e]], G[e], Pi[e], r)
        for f in v._fields:
            np.testing.assert_allclose(getattr(values, f)[e], getattr(v, f), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(getattr(ses, f)[e], getattr(s, f), rtol=1e-7, atol=1e-9)


def test_estimators_that_do_not_apply_say_why():
    rng = np.random.default_rng(2)
    S, T, keep = _pairs(rng, 2, 12, 4)                # P < 5 p: no full covariance
    assert "needs num_particles >= 5 x parameter dimension = 20" in divergence.gaussian_full_batch(S, T, keep).reason
    keep[1, 4:] = False                               # 4 pairs < knn_k + 2
    got = divergence.knn_batch(S, T, keep, k=5)
    assert np.isnan(got.value[1]) and np.isfinite(got.value[0]) and "knn_k + 2 = 7" in got.reason


def test_one_pipeline_and_its_stage_hook():
    """evaluation_mlp is gone; an extra stage sees the earlier columns and adds a
    column, a pooled row and a note."""
    assert not (Path(kdsim.__file__).parent / "evaluation_mlp.py").exists()
    run = kdsim.run_populations({"task": {"d": 2, "k": 1, "n": 16}, "num_datasets": 2, "num_particles": 16,
                                 "teacher": {"num_steps": 20}, "student": {"langevin": {"num_steps": 20}},
                                 "estimators": {"scratch": False}}, progress=False)

    def doubled_gap(ctx, so_far):
        row = bound_tables._pooled_table(None, "")
        row.loc["my_upper"] = [2.0, 1.0, 1.0, 1.0]
        return evaluation.StageOutput({"my_gap": 2 * so_far.columns["gen_S"]}, (row,), ("my note",))

    per, pooled, notes = evaluation.evaluate(run, extra_stages=(("bounds", doubled_gap),))
    np.testing.assert_array_equal(per["my_gap"], 2 * per["gen_S"])
    assert "my_upper" in pooled.index and "B0_upper" in pooled.index and "my note" in notes


def test_one_bound_program_serves_every_loss_family_and_similar_sizes():
    """sigma_bounded and has_b3 are traced and sizes are bucketed: datasets 3 and 5 of
    12 or 14 particles, bounded or not, with or without B3, run one compiled program."""
    rng = np.random.default_rng(3)
    before = bounds._empirical_family._cache_size()
    for E, P, sigma, b3 in ((3, 12, None, True), (5, 14, 1.0, False), (5, 12, None, False)):
        ok = rng.random((E, P)) > 0.05
        g = rng.normal(size=(E, P))
        z = np.zeros(E)
        inp = bound_tables.BoundInputs(
            gen_T=z, gen_T_se=z + 0.1, truth=z + 0.05, truth_se=z + 0.1, kl=z + 0.3, kl_se=z + 0.01,
            kl_reason="", g_T=g, ok=ok, usable=np.ones(E, bool), n_fit=8, cgf_kind="empirical",
            exact_cgfs=None, sharp={"G": z + 1, "S": z + 1, "rho": z + 0.1, "outside": z} if b3 else None,
            sharp_reason="", sigma_bounded=sigma, c_lam=0.5, ess_fraction=0.1)
        per, pooled = bound_tables.bound_arrays(inp)
        assert per.value.shape == (5, E) and np.all(np.isfinite(per.value[:4]))
        assert np.all(np.isnan(per.value[4])) != b3
        if sigma is not None:   # Hoeffding: B1 = gen_T + sqrt(2 sigma^2 KL)
            np.testing.assert_allclose(per.value[2], np.sqrt(2 * 0.3), rtol=1e-12)
    assert bounds._empirical_family._cache_size() - before <= 1


def test_jackknife_groups_follow_array_split_on_the_kept_entries():
    keep = np.array([[1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 0, 0, 1]], bool)
    masks, G = stats.jackknife_group_masks(keep, num_groups=3)
    assert G.tolist() == [3, 3]
    # row 0 keeps 5 entries in groups of 2, 2, 1 (np.array_split); row 1 keeps 4: 2, 1, 1
    kept0 = np.flatnonzero(keep[0])
    dropped = [kept0[~masks[0, g + 1, kept0]].tolist() for g in range(3)]
    assert dropped == [[0, 1], [3, 4], [5]]
    kept1 = np.flatnonzero(keep[1])
    assert [kept1[~masks[1, g + 1, kept1]].tolist() for g in range(3)] == [[0, 2], [3], [6]]
    assert not (masks & ~keep[:, None]).any()           # a dropped pair is in no mask
