"""Small statistical helpers: standard errors, bootstrap CIs, grouped jackknife.

Plain NumPy, float64. Randomness (the bootstrap) comes from an explicit
``numpy.random.Generator`` that the caller seeds; there is no global RNG.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps


def mean_se(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (sample std with ddof 1 over sqrt(count)) along ``axis``."""
    x = np.asarray(x, np.float64)
    count = x.shape[axis]
    mean = x.mean(axis=axis)
    se = x.std(axis=axis, ddof=1) / np.sqrt(count) if count > 1 else np.full_like(mean, np.nan)
    return mean, se


def bootstrap_ci(x: np.ndarray, rng: np.random.Generator, level: float = 0.95,
                 num_resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of a 1-d sample (NaN if fewer than 2 values)."""
    x = np.asarray(x, np.float64)
    if x.size < 2:
        return float("nan"), float("nan")
    lo, hi = bootstrap_ci_columns(x.reshape(-1, 1), rng, level, num_resamples)
    return float(lo[0]), float(hi[0])


def bootstrap_ci_columns(X: np.ndarray, rng: np.random.Generator, level: float = 0.95,
                         num_resamples: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CIs of the mean of every column of ``X`` ``(n, C)``, ``(C,)`` each.

    The columns share one set of resamples of the n rows (a paired bootstrap: each
    column's interval has its usual law). A resample is a multinomial count vector, so
    the resampled means are one ``(R, n) x (n, C)`` product. NaN if ``n < 2``.
    """
    X = np.asarray(X, np.float64)
    n, C = X.shape
    if n < 2:
        return np.full(C, np.nan), np.full(C, np.nan)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=num_resamples).astype(np.float64)
    means = counts @ X / n
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    # a constant column's resampled means may differ from it in the last bit
    const = (X == X[:1]).all(axis=0)
    return np.where(const, X[0], lo), np.where(const, X[0], hi)


def jackknife_masks(n: int, num_groups: int = 32) -> np.ndarray:
    """``(G + 1, n)`` boolean masks: row 0 keeps every sample, row g+1 drops group g.

    Groups are G = min(num_groups, n) contiguous blocks (G = n: the ordinary jackknife).
    """
    G = int(min(num_groups, n))
    masks = np.ones((G + 1, n), bool)
    for g, idx in enumerate(np.array_split(np.arange(n), G)):
        masks[g + 1, idx] = False
    return masks


def jackknife_combine(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Delete-a-group jackknife from estimates on the masks of :func:`jackknife_masks`.

    Args:
      theta: ``(G + 1, ...)``: the full-sample estimate, then the G leave-group-out ones.
    Returns:
      ``(theta_jack, se)``: ``theta_jack = G theta - (G - 1) mean_g theta_(g)`` removes
      the O(1/n) bias; ``se^2 = (G - 1)/G sum_g (theta_(g) - mean)^2``.
    """
    G = theta.shape[0] - 1
    full, loo = theta[0], theta[1:]
    mean_loo = loo.mean(axis=0)
    estimate = G * full - (G - 1) * mean_loo
    se = np.sqrt((G - 1) / G * ((loo - mean_loo) ** 2).sum(axis=0))
    return estimate, se


def bonferroni_z(num_tests: int, familywise: float = 1e-3) -> float:
    """Two-sided |z| limit that keeps the family-wise false-alarm rate at ``familywise``."""
    return float(sps.norm.isf(familywise / (2 * max(num_tests, 1))))


def per_dataset(fn, *arrays):
    """``fn(*arrays)`` for batched float64 linear algebra that never raises.

    Every array has the leading dataset axis E; ``fn`` returns an array or a (named)
    tuple of arrays, each with leading axis E. A dataset whose inputs are not all finite
    gets NaN (its inputs are swapped for a harmless stand-in so the batch still runs); if
    the batch raises ``LinAlgError``, the datasets are redone one at a time and those
    that fail get NaN. Callers name the NaN columns, and why, in the notes.
    """
    arrays = [np.asarray(a, np.float64) for a in arrays]
    E = arrays[0].shape[0]
    finite = np.ones(E, bool)
    for a in arrays:
        finite &= np.isfinite(a.reshape(E, -1)).all(axis=1)

    def stand_in(a):
        if finite.any():
            return a[np.argmax(finite)]
        if a.ndim >= 3 and a.shape[-1] == a.shape[-2]:       # a covariance: the identity
            return np.broadcast_to(np.eye(a.shape[-1]), a.shape[1:])
        return np.zeros(a.shape[1:])

    safe = [np.where(finite.reshape((E,) + (1,) * (a.ndim - 1)), a, stand_in(a)) if a.ndim
            else a for a in arrays]
    try:
        with np.errstate(all="ignore"):
            out = fn(*safe)
    except np.linalg.LinAlgError:
        parts = []
        for e in range(E):
            try:
                with np.errstate(all="ignore"):
                    parts.append(fn(*[a[e:e + 1] for a in safe]))
            except np.linalg.LinAlgError:
                parts.append(None)
                finite[e] = False
        template = next((p for p in parts if p is not None), None)
        if template is None:                    # nothing evaluates: shapes from a stand-in
            finite[:] = False
            with np.errstate(all="ignore"):
                template = fn(*[np.broadcast_to(stand_in(a), (1,) + a.shape[1:]) for a in safe])
        nan_like = _map(lambda x: np.full(np.shape(x), np.nan), template)
        parts = [nan_like if p is None else p for p in parts]
        out = _map(lambda *xs: np.concatenate([np.asarray(x, np.float64) for x in xs]), *parts)
    return _map(lambda x: np.where(finite.reshape((E,) + (1,) * (np.ndim(x) - 1)), x, np.nan), out)


def _map(f, *trees):
    """``f`` over arrays or leafwise over (named) tuples of arrays."""
    if isinstance(trees[0], tuple):
        values = [f(*xs) for xs in zip(*trees)]
        return type(trees[0])(*values) if hasattr(trees[0], "_fields") else tuple(values)
    return f(*trees)


def masked_mean_se(x: np.ndarray, mask: np.ndarray, usable: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mean_se` over the entries of each row of ``x`` ``(E, P)`` kept by ``mask``.

    Rows outside ``usable`` ``(E,)`` (default: rows with at least one entry), and the
    se of rows with fewer than two entries, are NaN. All rows at once, no loop.
    """
    x = np.asarray(x, np.float64)
    mask = np.asarray(mask, bool)
    count = mask.sum(axis=-1)
    if usable is None:
        usable = count > 0
    safe = np.maximum(count, 1)
    xm = np.where(mask, x, 0.0)
    mean = xm.sum(axis=-1) / safe
    dev = np.where(mask, x - mean[..., None], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt((dev * dev).sum(axis=-1) / (count - 1)) / np.sqrt(safe)
    se = np.where(count > 1, se, np.nan)
    return np.where(usable, mean, np.nan), np.where(usable, se, np.nan)


def jackknife_group_masks(keep: np.ndarray, num_groups: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """:func:`jackknife_masks` of the kept entries of every row, all rows at once.

    Row e keeps the entries ``keep[e]`` ``(E, P)``; its ``G_e = min(num_groups, n_e)``
    groups are contiguous blocks of the kept entries, sized as ``np.array_split`` sizes
    them (so a row with every entry kept gets exactly :func:`jackknife_masks`).
    Returns ``(masks, G)``: ``(E, G_max + 1, P)`` (row 0 keeps every kept entry, row g+1
    drops group g; rows beyond ``G_e`` repeat row 0) and ``G`` ``(E,)``.
    """
    keep = np.asarray(keep, bool)
    E, P = keep.shape
    n = keep.sum(axis=1)
    G = np.minimum(num_groups, n)
    G_max = int(min(num_groups, P))
    rank = np.cumsum(keep, axis=1) - 1                                # rank among the kept
    Gs = np.maximum(G, 1)[:, None]
    q, r = (n[:, None] // Gs), (n[:, None] % Gs)                       # r groups of q + 1
    big = r * (q + 1)
    group = np.where(rank < big, rank // np.maximum(q + 1, 1),
                     r + (rank - big) // np.maximum(q, 1))
    group = np.where(keep, group, -1)                                  # (E, P)
    drop = group[:, None, :] == np.arange(G_max)[None, :, None]        # (E, G_max, P)
    masks = np.concatenate([keep[:, None], keep[:, None] & ~drop], axis=1)
    return masks, G


def jackknife_combine_rows(theta: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`jackknife_combine` per row with ``G[e]`` groups: ``theta`` ``(E, G_max + 1, ...)``
    from the masks of :func:`jackknife_group_masks` (rows beyond ``G_e`` are ignored)."""
    theta = np.asarray(theta, np.float64)
    E, Gp = theta.shape[:2]
    shape = (E, Gp - 1) + (1,) * (theta.ndim - 2)
    valid = (np.arange(Gp - 1)[None] < G[:, None]).reshape(shape)
    Gf = np.asarray(G, np.float64).reshape((E,) + (1,) * (theta.ndim - 2))
    full, loo = theta[:, 0], theta[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_loo = np.where(valid, loo, 0.0).sum(axis=1) / Gf
        estimate = Gf * full - (Gf - 1) * mean_loo
        se = np.sqrt((Gf - 1) / Gf * np.where(valid, (loo - mean_loo[:, None]) ** 2, 0.0).sum(axis=1))
    return estimate, se
