"""The ``pool`` task (SPEC §9 "Data"): mu is the uniform distribution on a finite pool.

A pool of N labelled points (:mod:`kdsim.tasks.sources`) defines mu = uniform on the
pool. Dataset e is n draws of pool indices from its own key (stream ``pool_index``),
with replacement by default, so the i.i.d. assumption of the theory holds exactly
(``sampling = "without_replacement"`` draws n distinct points: an option that breaks
it). The population risk is exact, the pool average of the loss, evaluated block by
block of the pool (:func:`pool_risk`) so memory stays bounded for large pools. Ghost
points are fresh i.i.d. draws from mu (:func:`ghost_points`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import losses, streams
from .sources import DataError, Pool

BLOCK = 1024   # pool points evaluated at once per particle


class PoolData(NamedTuple):
    """Datasets of a pool task (NumPy, leading axis E)."""

    X: np.ndarray        # (E, n, *input_shape) float32: the drawn points
    Y: np.ndarray        # (E, n, k) float32, or (E, n) int32 labels
    index: np.ndarray    # (E, n) int32: pool indices of the drawn points
    pool: Pool
    classification: bool


class Blocks(NamedTuple):
    """The pool cut into equal blocks; padding points have weight 0."""

    X: jax.Array         # (B, block, *input_shape)
    Y: jax.Array         # (B, block, k) or (B, block)
    weight: jax.Array    # (B, block): 1/N on pool points, 0 on padding


def check_size(pool: Pool, n: int, sampling: str) -> None:
    """``n > N`` is impossible without replacement: :class:`DataError` before anything runs."""
    if sampling == "without_replacement" and n > pool.size:
        raise DataError(f"task.n = {n} is larger than the pool (N = {pool.size} points) with "
                        "task.sampling = 'without_replacement'; lower task.n or use "
                        "task.sampling = 'iid' (with replacement)")


def sample_indices(key: jax.Array, N: int, n: int, replace: bool) -> jax.Array:
    """``(n,)`` pool indices: uniform i.i.d. draws, or n distinct points (``replace=False``)."""
    if replace:
        return jax.random.randint(key, (n,), 0, N, dtype=jnp.int32)
    return jax.random.choice(key, N, (n,), replace=False).astype(jnp.int32)


@partial(jax.jit, static_argnames=("N", "n", "replace"))
def _indices(stream: jax.Array, datasets: jax.Array, *, N: int, n: int, replace: bool):
    return jax.vmap(lambda e: sample_indices(jax.random.fold_in(stream, e), N, n, replace))(datasets)


def make_data(root: jax.Array, datasets: np.ndarray, pool: Pool, *, n: int,
              sampling: str = "iid") -> PoolData:
    """Draw the training sets of the given global datasets from the pool.

    Dataset e's indices come from ``fold_in(stream("pool_index"), e)`` only, so a dataset
    is the same whichever datasets run with it.
    """
    check_size(pool, n, sampling)
    idx = np.asarray(_indices(streams.stream_key(root, "pool_index"),
                              jnp.asarray(datasets, jnp.uint32), N=pool.size, n=n,
                              replace=sampling == "iid"))
    return PoolData(pool.X[idx], pool.Y[idx], idx, pool, pool.classification)


def ghost_points(stream: jax.Array, datasets: np.ndarray, pool: Pool, m: int):
    """``m`` fresh i.i.d. draws from mu per dataset (always with replacement: they stand
    for the population): ``(X (E, m, ...), Y (E, m, ...), index (E, m))``."""
    idx = np.asarray(_indices(stream, jnp.asarray(datasets, jnp.uint32), N=pool.size, n=m,
                              replace=True))
    return pool.X[idx], pool.Y[idx], idx


def blocks(pool: Pool, dtype, block: int = BLOCK) -> Blocks:
    """The pool as ``ceil(N / block)`` blocks (the last padded with weight-0 copies of point 0)."""
    N = pool.size
    b = min(block, N)
    nb = -(-N // b)
    pad = nb * b - N
    take = np.concatenate([np.arange(N), np.zeros(pad, np.int64)])
    X = pool.X[take].reshape((nb, b) + pool.X.shape[1:])
    Y = pool.Y[take].reshape((nb, b) + pool.Y.shape[1:])
    w = np.concatenate([np.full(N, 1.0 / N), np.zeros(pad)]).reshape(nb, b)
    Yj = jnp.asarray(Y) if pool.classification else jnp.asarray(Y, dtype)
    return Blocks(jnp.asarray(X, dtype), Yj, jnp.asarray(w, dtype))


def pool_risk(apply: Callable, w, pool: Blocks, classification: bool) -> dict:
    """Exact population risks of ONE particle: the pool averages of its losses.

    A scan over the pool's blocks (memory: one block's activations), differentiable.
    Returns ``{"test": mean task loss}`` and, for classification, ``"test_01"``.
    """
    loss = losses.task_loss(classification)

    def body(acc, blk):
        Xb, Yb, wb = blk
        f = apply(w, Xb)
        out = {"test": jnp.sum(wb * jax.vmap(loss)(f, Yb))}
        if classification:
            out["test_01"] = jnp.sum(wb * jax.vmap(losses.zero_one)(f, Yb))
        return jax.tree_util.tree_map(jnp.add, acc, out), None

    zero = jnp.zeros((), pool.weight.dtype)
    init = {"test": zero, **({"test_01": zero} if classification else {})}
    total, _ = jax.lax.scan(body, init, (pool.X, pool.Y, pool.weight))
    return total
