"""MLP tasks (SPEC §6): ``mlp_regression`` and ``mlp_classification``.

``x ~ N(0, I_d)``; a planted network
``f*(x) = planted_scale * A tanh(B x / sqrt(d)) / sqrt(planted_width)`` with A, B
standard normal, fixed per seed. Regression: ``y = f*(x) + nu eps`` (k outputs).
Classification: K classes, ``y ~ Cat(softmax(f*(x)))``.

The population risk has no closed form: each dataset gets ``n_test`` fresh test points
(stream ``test``), shared by all particles of the dataset, and ``L_mu`` is their mean
loss. Losses are written for ONE example; risks are means over points.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import streams


class MLPData(NamedTuple):
    """Datasets of an MLP task (NumPy, leading axis E)."""

    X: np.ndarray        # (E, n, d) float32
    Y: np.ndarray        # (E, n, k) float32, or (E, n) int32 labels
    X_test: np.ndarray   # (E, n_test, d)
    Y_test: np.ndarray   # (E, n_test, k) or (E, n_test)
    A: np.ndarray        # (out, planted_width) planted read-out
    B: np.ndarray        # (planted_width, d) planted input weights
    classification: bool


def planted_function(x: jax.Array, A: jax.Array, B: jax.Array, scale) -> jax.Array:
    """``f*(x)`` for inputs ``(..., d)`` -> ``(..., out)``."""
    d, width = B.shape[1], B.shape[0]
    h = jnp.tanh(x @ B.T / jnp.sqrt(jnp.asarray(d, x.dtype)))
    return scale * h @ A.T / jnp.sqrt(jnp.asarray(width, x.dtype))


@partial(jax.jit, static_argnames=("n", "out", "classification"))
def _sample(x_stream, y_stream, datasets, A, B, scale, noise, *, n: int, out: int,
            classification: bool):
    """``(E, n, d)`` inputs and their targets; dataset e draws from ``fold_in(stream, e)``."""
    d = B.shape[1]

    def one(e):
        x = streams.normal(jax.random.fold_in(x_stream, e), (n, d))
        f = planted_function(x, A, B, scale)
        ky = jax.random.fold_in(y_stream, e)
        if classification:
            y = jax.random.categorical(ky, f, axis=-1).astype(jnp.int32)
        else:
            y = f + noise * streams.normal(ky, (n, out))
        return x, y

    return jax.vmap(one)(datasets)


def make_data(root: jax.Array, datasets: np.ndarray, *, n: int, d: int, out: int, n_test: int,
              planted_width: int, planted_scale: float, noise: float,
              classification: bool) -> MLPData:
    """Draw training and test sets of the given global datasets."""
    key = streams.stream_key(root, "task")
    A = streams.normal(jax.random.fold_in(key, 0), (out, planted_width))
    B = streams.normal(jax.random.fold_in(key, 1), (planted_width, d))
    ds = jnp.asarray(datasets, jnp.uint32)
    common = dict(datasets=ds, A=A, B=B, scale=jnp.float32(planted_scale),
                  noise=jnp.float32(noise), out=out, classification=classification)
    X, Y = _sample(streams.stream_key(root, "data_x"), streams.stream_key(root, "data_y"),
                   n=n, **common)
    X_test, Y_test = _sample(streams.stream_key(root, "test"), streams.stream_key(root, "test_y"),
                             n=n_test, **common)
    return MLPData(np.asarray(X), np.asarray(Y), np.asarray(X_test), np.asarray(Y_test),
                   np.asarray(A), np.asarray(B), classification)
