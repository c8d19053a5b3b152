"""The supersample design of the CMI bounds (SPEC §10; Steinke & Zakynthinou 2020).

A supersample ``Z~`` is n pairs ``(z_i0, z_i1)`` drawn i.i.d. from mu; a mask
``U in {0,1}^n`` picks ``z_{i U_i}`` of each pair as the training set ``D_U``, the other
point ``z_{i (1 - U_i)}`` is held out. A supersample run trains ``M`` masks per
supersample, each with its own P particles, so the population's dataset axis is
supersamples x masks: dataset ``e = s M + m`` is supersample ``s = e // M`` under mask
``m = e % M``.

Every draw is keyed by global index, as for ordinary datasets (:mod:`kdsim.streams`):
supersample s's 2n points come from the task's data streams at index s (pair i is points
2i, 2i + 1), and the mask of dataset e from its OWN stream ``mask`` at index e. So the
masks are independent of the data (the CMI bounds rest on this), and since
``z_{i U_i}`` is then a draw from mu whatever ``U_i``, each ``D_U`` is n i.i.d. draws
from mu: every per-dataset estimate and KD bound of an ordinary run stays valid.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import streams
from . import linear_gaussian as lg
from . import mlp as mlp_task
from . import pool as pool_task
from .sources import DataError, Pool


class Pairs(NamedTuple):
    """The supersample pairs and masks of a set of datasets (NumPy, leading axis E)."""

    X: np.ndarray         # (E, n, 2, *input_shape): pair i of dataset e's supersample
    Y: np.ndarray         # (E, n, 2, k) float targets, or (E, n, 2) int labels
    U: np.ndarray         # (E, n) int32 in {0, 1}: z_{i U_i} is a training point
    supersample: np.ndarray   # (E,) int: s = e // M
    mask: np.ndarray      # (E,) int: m = e % M
    index: np.ndarray | None = None   # pool tasks: (E, n, 2) pool indices


def split(datasets: np.ndarray, masks: int) -> tuple[np.ndarray, np.ndarray]:
    """Global dataset indices ``e`` -> (supersample ``e // M``, mask ``e % M``)."""
    datasets = np.asarray(datasets, np.int64)
    return datasets // masks, datasets % masks


@partial(jax.jit, static_argnames=("n",))
def _masks(stream: jax.Array, base: jax.Array, flip: jax.Array, *, n: int) -> jax.Array:
    bits = jax.vmap(lambda e: jax.random.bernoulli(jax.random.fold_in(stream, e), 0.5, (n,)))(base)
    return jnp.where(flip[:, None], ~bits, bits).astype(jnp.int32)


def draw_masks(root: jax.Array, datasets: np.ndarray, n: int, masks: int) -> np.ndarray:
    """``(E, n)`` masks from the stream ``mask`` only (independent of every data stream).

    Antithetic: mask ``m < M/2`` of supersample s is ``n`` fair bits drawn from
    ``fold_in(stream("mask"), s M + m)``, and mask ``m + M/2`` is its complement. Every
    mask is uniform on ``{0,1}^n`` and independent of the data; in addition each pair's
    mask bit is 0 in exactly half of the M runs, so the empirical law of ``U_i`` is the
    fair bit the CMI bounds compare with, and each plug-in bound is then a deterministic
    upper bound on the held-out gap of the same samples (DV on the empirical law).
    """
    s, m = split(datasets, masks)
    half = masks // 2
    base = s * masks + m % half
    return np.asarray(_masks(streams.stream_key(root, "mask"), jnp.asarray(base, jnp.uint32),
                             jnp.asarray(m >= half), n=n))


def take(pairs: np.ndarray, U: np.ndarray) -> np.ndarray:
    """The points ``pairs[e, i, U[e, i]]``: ``(E, n, 2, ...) -> (E, n, ...)``."""
    idx = U.reshape(U.shape + (1,) * (pairs.ndim - 2))
    return np.take_along_axis(pairs, idx, axis=2)[:, :, 0]


def _per_supersample(draw: Callable, supersample: np.ndarray):
    """Draw each distinct supersample once and give every dataset its supersample's pairs."""
    unique, inverse = np.unique(supersample, return_inverse=True)
    return [np.asarray(a)[inverse] for a in draw(unique)]


def _pairs(a: np.ndarray, n: int) -> np.ndarray:
    """``(E, 2n, ...) -> (E, n, 2, ...)``: pair i is points 2i and 2i + 1."""
    return a.reshape((a.shape[0], n, 2) + a.shape[2:])


def linear_pairs(root: jax.Array, datasets: np.ndarray, masks: int, n: int, W_star: np.ndarray,
                 sx: np.ndarray, noise: float) -> Pairs:
    """Pairs and masks of the linear task's datasets (float64)."""
    s, m = split(datasets, masks)
    X, Y = _per_supersample(lambda u: lg.sample_points(
        streams.stream_key(root, "data_x"), streams.stream_key(root, "data_y"), u, 2 * n,
        W_star, sx, noise), s)
    return Pairs(_pairs(X, n), _pairs(Y, n), draw_masks(root, datasets, n, masks), s, m)


def mlp_pairs(root: jax.Array, datasets: np.ndarray, masks: int, n: int, A: np.ndarray,
              B: np.ndarray, planted_scale: float, noise: float, classification: bool) -> Pairs:
    """Pairs and masks of a planted-MLP task's datasets."""
    s, m = split(datasets, masks)
    out = A.shape[0]
    X, Y = _per_supersample(lambda u: mlp_task._sample(
        streams.stream_key(root, "data_x"), streams.stream_key(root, "data_y"),
        jnp.asarray(u, jnp.uint32), jnp.asarray(A), jnp.asarray(B), jnp.float32(planted_scale),
        jnp.float32(noise), n=2 * n, out=out, classification=classification), s)
    return Pairs(_pairs(X, n), _pairs(Y, n), draw_masks(root, datasets, n, masks), s, m)


def pool_pairs(root: jax.Array, datasets: np.ndarray, masks: int, n: int, pool: Pool,
               sampling: str) -> Pairs:
    """Pairs and masks of a pool task's datasets (2n draws from the pool per supersample)."""
    if sampling == "without_replacement" and 2 * n > pool.size:
        raise DataError(f"a supersample of 2 x task.n = {2 * n} distinct points is larger than "
                        f"the pool (N = {pool.size}) with task.sampling = 'without_replacement'; "
                        "lower task.n or use task.sampling = 'iid'")
    s, m = split(datasets, masks)
    (idx,) = _per_supersample(lambda u: (pool_task._indices(
        streams.stream_key(root, "pool_index"), jnp.asarray(u, jnp.uint32), N=pool.size,
        n=2 * n, replace=sampling == "iid"),), s)
    idx = _pairs(np.asarray(idx), n)
    return Pairs(pool.X[idx], pool.Y[idx], draw_masks(root, datasets, n, masks), s, m, idx)


def data_maker(static: Any, numeric: Any, root: jax.Array, pool: Pool | None = None):
    """``make(datasets) -> task data`` of a supersample run: each dataset's training set is
    its supersample's masked half; everything else (planted weights, test sets drawn per
    global dataset index) is exactly what an ordinary run draws."""
    st, nm = static, numeric
    M, n = st.masks, st.n

    if st.task == "linear_gaussian":
        def make(ds):
            sx = lg.input_variances(st.d, nm.input_scale, nm.input_decay)
            W_star = lg.planted_weights(root, st.d, st.k, nm.signal_decay)
            pr = linear_pairs(root, ds, M, n, W_star, sx, nm.noise)
            return lg.from_points(take(pr.X, pr.U), take(pr.Y, pr.U), W_star, sx, nm.noise,
                                  rank=st.rank, full_student=st.full_student)
        return make

    if st.task == "pool":
        def make(ds):
            pr = pool_pairs(root, ds, M, n, pool, st.sampling)
            return pool_task.PoolData(take(pr.X, pr.U), take(pr.Y, pr.U), take(pr.index, pr.U),
                                      pool, pool.classification)
        return make

    out = st.num_classes if st.classification else st.k

    def make(ds):
        # the ordinary draw gives the planted network and each dataset's test set; its
        # training points are replaced by the masked halves
        base = mlp_task.make_data(root, ds, n=n, d=st.d, out=out, n_test=st.n_test,
                                  planted_width=st.planted_width, planted_scale=nm.planted_scale,
                                  noise=nm.noise, classification=st.classification)
        pr = mlp_pairs(root, ds, M, n, base.A, base.B, nm.planted_scale, nm.noise,
                       st.classification)
        return base._replace(X=take(pr.X, pr.U), Y=take(pr.Y, pr.U))
    return make


def pairs_of(run: Any) -> Pairs:
    """The pairs and masks of every dataset of a finished supersample run (redrawn from
    the run's seed: the same numbers the run trained on)."""
    st, nm, data = run.resolved.static, run.resolved.numeric, run.data
    root = streams.root_key(run.config.seed)
    ds = np.arange(st.num_datasets)
    if st.task == "linear_gaussian":
        return linear_pairs(root, ds, st.masks, st.n, data.W_star, data.sx, nm.noise)
    if st.task == "pool":
        return pool_pairs(root, ds, st.masks, st.n, data.pool, st.sampling)
    return mlp_pairs(root, ds, st.masks, st.n, data.A, data.B, nm.planted_scale, nm.noise,
                     st.classification)
