"""kdsim.stats against textbook cases: Bonferroni limit, jackknife, bootstrap, mean/se."""

import numpy as np
import pytest
from scipy import stats as sps

from kdsim import stats


def test_bonferroni_limit_is_the_normal_quantile_of_the_split_level():
    for m, fw in [(1, 1e-3), (7, 1e-3), (1000, 1e-3), (24, 0.05)]:
        # two-sided: P(max_i |z_i| > limit) <= m * 2 * Phi(-limit) = familywise
        # (ppf of 1 - p carries the rounding of 1 - p: ~1e-16 / p relative in p)
        expected = sps.norm.ppf(1 - fw / (2 * m))
        assert stats.bonferroni_z(m, fw) == pytest.approx(expected, rel=1e-9)
    assert stats.bonferroni_z(1, 0.05) == pytest.approx(1.959963984540054, rel=1e-12)
    assert stats.bonferroni_z(0) == stats.bonferroni_z(1)        # no tests: one test's limit


def test_mean_se_is_the_sample_mean_and_s_over_root_n():
    x = np.array([[1.0, 2.0, 4.0, 7.0], [0.0, 0.0, 3.0, 1.0]])
    mean, se = stats.mean_se(x)
    np.testing.assert_allclose(mean, [3.5, 1.0])
    # s^2 = sum (x - xbar)^2 / (n - 1): (6.25 + 2.25 + 0.25 + 12.25) / 3 = 7; (1+1+4+0)/3 = 2
    np.testing.assert_allclose(se, np.sqrt([7.0 / 4, 2.0 / 4]), rtol=1e-14)
    assert np.isnan(stats.mean_se(np.ones(1))[1])


def test_jackknife_of_the_mean_is_s_over_root_n_and_removes_plugin_variance_bias():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=37)
    n = x.size
    masks = stats.jackknife_masks(n, num_groups=n)               # the ordinary jackknife
    assert masks.shape == (n + 1, n) and masks[0].all() and (masks[1:].sum(1) == n - 1).all()
    theta = np.array([x[m].mean() for m in masks])
    est, se = stats.jackknife_combine(theta)
    assert est == pytest.approx(x.mean(), rel=1e-13)
    assert se == pytest.approx(x.std(ddof=1) / np.sqrt(n), rel=1e-12)
    # the plug-in variance (ddof 0) has bias -sigma^2/n; its jackknife is exactly ddof 1
    theta = np.array([x[m].var() for m in masks])
    assert stats.jackknife_combine(theta)[0] == pytest.approx(x.var(ddof=1), rel=1e-12)
    # grouped: 10 contiguous blocks (sizes 4 and 3) that together drop every sample once
    g = stats.jackknife_masks(n, num_groups=10)
    assert g.shape == (11, n) and sorted((~g[1:]).sum(1)) == [3] * 3 + [4] * 7
    assert ((~g[1:]).sum(0) == 1).all()


def test_bootstrap_ci_covers_the_mean_at_its_level():
    """400 samples of n = 60 from N(2, 1): the 90% percentile interval covers 2 in a
    fraction within 4 binomial standard errors of 0.90 (percentile CIs
    under-cover by about 1/n at this size, well inside that error)."""
    rng = np.random.default_rng(1)
    hits, widths = [], []
    for _ in range(400):
        x = rng.normal(2.0, 1.0, size=60)
        lo, hi = stats.bootstrap_ci(x, rng, level=0.90, num_resamples=400)
        hits.append(lo <= 2.0 <= hi)
        widths.append(hi - lo)
    cover = np.mean(hits)
    assert abs(cover - 0.90) < 4 * np.sqrt(0.9 * 0.1 / 400), cover
    # known width: 2 z_{0.95} sigma / sqrt(n) = 0.4247; bootstrap spread uses ddof 0
    assert np.mean(widths) == pytest.approx(2 * sps.norm.ppf(0.95) / np.sqrt(60), rel=0.05)
    assert stats.bootstrap_ci(np.full(5, 3.0), rng) == (3.0, 3.0)
    assert all(np.isnan(stats.bootstrap_ci(np.ones(1), rng)))


def test_bootstrap_ci_columns_cover_each_column_and_share_resamples():
    """300 columns of n = 60 from N(2, 1), in one call: the 90% intervals cover 2 in a
    fraction within 4 binomial standard errors of 0.90, with the known width; a column
    that is an affine map of another gets the mapped interval (one set of resamples
    for all columns), and constant columns give a zero-width interval at the value."""
    rng = np.random.default_rng(2)
    X = rng.normal(2.0, 1.0, size=(60, 300))
    lo, hi = stats.bootstrap_ci_columns(X, rng, level=0.90, num_resamples=400)
    assert lo.shape == hi.shape == (300,) and (lo < hi).all()
    cover = np.mean((lo <= 2.0) & (2.0 <= hi))
    assert abs(cover - 0.90) < 4 * np.sqrt(0.9 * 0.1 / 300), cover
    assert np.mean(hi - lo) == pytest.approx(2 * sps.norm.ppf(0.95) / np.sqrt(60), rel=0.05)
    x = X[:, 0]
    Y = np.stack([x, 3.0 * x - 1.0, np.full(60, 0.1)], axis=1)
    lo, hi = stats.bootstrap_ci_columns(Y, np.random.default_rng(3))
    assert lo[1] == pytest.approx(3.0 * lo[0] - 1.0, rel=1e-12)
    assert hi[1] == pytest.approx(3.0 * hi[0] - 1.0, rel=1e-12)
    assert (lo[2], hi[2]) == (0.1, 0.1)
    assert np.isnan(stats.bootstrap_ci_columns(Y[:1], rng)).all()
