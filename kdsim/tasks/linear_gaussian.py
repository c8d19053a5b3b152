"""The linear Gaussian task (SPEC §3).

``x ~ N(0, Sx)``, ``Sx = diag(c j^(-a))``; ``y = W* x + nu eps``; model ``f_W(x) = W x``
with loss ``0.5 ||y - W x||^2``. ``W*`` (k x d) has singular values ``j^(-b)`` and
Haar-random singular vectors, fixed per seed.

Data are drawn from the run's random streams in float32 (so a seed gives the same
datasets whatever the engine precision) and assembled in float64; the dataset-level
statistics the engine and the closed forms share (``Cxx``, ``Cyx``, the student
subspace ``Pi``) are computed once, in float64, on the host.

The empirical risk depends on the data only through sufficient statistics:

.. math::

    \\hat L_D(W) = \\tfrac12 [\\mathrm{tr}(W C_{xx} W^T) - 2\\,\\mathrm{tr}(C_{yx} W^T) + \\mathrm{tr}\\, C_{yy}],

so a Langevin step costs O(k d^2) whatever n is.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import streams

HIGHEST = jax.lax.Precision.HIGHEST


class LinearData(NamedTuple):
    """Datasets and their statistics, float64 NumPy, leading axis E (datasets)."""

    X: np.ndarray        # (E, n, d) training inputs
    Y: np.ndarray        # (E, n, k) training targets
    W_star: np.ndarray   # (k, d) planted weights
    sx: np.ndarray       # (d,) diagonal of Sx
    Cxx: np.ndarray      # (E, d, d) X^T X / n
    Cyx: np.ndarray      # (E, k, d) Y^T X / n
    Cyy: np.ndarray      # (E,) mean_i ||y_i||^2
    Pi: np.ndarray       # (E, d, r) student subspace (top-r eigenvectors of Cxx; I if full)
    noise: float         # nu


def input_variances(d: int, input_scale: float, input_decay: float) -> np.ndarray:
    """``(d,)`` diagonal of Sx."""
    j = np.arange(1, d + 1, dtype=np.float64)
    return input_scale * j ** (-input_decay)


def _haar_orthogonal(g: np.ndarray) -> np.ndarray:
    """Haar-distributed orthogonal matrix from a square Gaussian matrix (sign-fixed QR)."""
    q, r = np.linalg.qr(g)
    return q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))


def planted_weights(root: jax.Array, d: int, k: int, signal_decay: float) -> np.ndarray:
    """``(k, d)`` W* with singular values ``j^(-b)`` and Haar singular vectors."""
    key = streams.stream_key(root, "task")
    gu = np.asarray(streams.normal(jax.random.fold_in(key, 0), (k, k)), np.float64)
    gv = np.asarray(streams.normal(jax.random.fold_in(key, 1), (d, d)), np.float64)
    u, v = _haar_orthogonal(gu), _haar_orthogonal(gv)
    m = min(k, d)
    s = np.arange(1, m + 1, dtype=np.float64) ** (-signal_decay)
    return (u[:, :m] * s) @ v[:, :m].T


@partial(jax.jit, static_argnames=("n", "d", "k"))
def _standard_draws(x_stream: jax.Array, y_stream: jax.Array, datasets: jax.Array, n: int, d: int,
                    k: int):
    """``(E, n, d)`` and ``(E, n, k)`` standard normals; dataset e uses ``fold_in(stream, e)``."""
    zx = jax.vmap(lambda e: streams.normal(jax.random.fold_in(x_stream, e), (n, d)))(datasets)
    zy = jax.vmap(lambda e: streams.normal(jax.random.fold_in(y_stream, e), (n, k)))(datasets)
    return zx, zy


def sample_points(x_stream: jax.Array, y_stream: jax.Array, datasets: np.ndarray, n: int,
                  W_star: np.ndarray, sx: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fresh points ``(x, y)`` per dataset, float64: ``(E, n, d)``, ``(E, n, k)``."""
    k, d = W_star.shape
    zx, zy = _standard_draws(x_stream, y_stream, jnp.asarray(datasets, jnp.uint32), n, d, k)
    X = np.asarray(zx, np.float64) * np.sqrt(sx)
    return X, X @ W_star.T + noise * np.asarray(zy, np.float64)


def student_subspace(Cxx: np.ndarray, rank: int, full: bool) -> np.ndarray:
    """``(E, d, r)``: top-r eigenvectors of Cxx, in descending order (identity if full)."""
    E, d, _ = Cxx.shape
    if full:
        return np.broadcast_to(np.eye(d), (E, d, d)).copy()
    _, vecs = np.linalg.eigh(Cxx)
    return vecs[..., ::-1][..., :rank].copy()


def make_data(root: jax.Array, datasets: np.ndarray, *, n: int, d: int, k: int, rank: int,
              full_student: bool, noise: float, input_scale: float, input_decay: float,
              signal_decay: float) -> LinearData:
    """Draw the datasets with the given global indices and their float64 statistics."""
    sx = input_variances(d, input_scale, input_decay)
    W_star = planted_weights(root, d, k, signal_decay)
    X, Y = sample_points(streams.stream_key(root, "data_x"), streams.stream_key(root, "data_y"),
                         datasets, n, W_star, sx, noise)
    return from_points(X, Y, W_star, sx, noise, rank=rank, full_student=full_student)


def from_points(X: np.ndarray, Y: np.ndarray, W_star: np.ndarray, sx: np.ndarray, noise: float, *,
                rank: int, full_student: bool) -> LinearData:
    """The float64 statistics of given training sets ``X (E, n, d)``, ``Y (E, n, k)``
    (e.g. the supersample design's training halves, :mod:`kdsim.tasks.supersample`)."""
    n = X.shape[1]
    Cxx = np.einsum("eni,enj->eij", X, X) / n
    Cyx = np.einsum("enk,enj->ekj", Y, X) / n
    Cyy = np.einsum("enk,enk->e", Y, Y) / n
    Pi = student_subspace(Cxx, rank, full_student)
    return LinearData(X, Y, W_star, sx, Cxx, Cyx, Cyy, Pi, float(noise))


# ---------------------------------------------------------------------------------------
# Risks of ONE parameter matrix (vmap outside). Quadratic forms in sufficient statistics.


def quadratic_grad(W: jax.Array, C: jax.Array, B: jax.Array) -> jax.Array:
    """Gradient of ``0.5 tr(W C W^T) - tr(B W^T)`` for symmetric C: ``W C - B``.

    Shapes: W ``(k, p)``, C ``(p, p)``, B ``(k, p)``.
    """
    return W @ C - B


def empirical_risk(W: jax.Array, Cxx: jax.Array, Cyx: jax.Array, Cyy: jax.Array) -> jax.Array:
    """``Lhat_D(W)``; W ``(k, d)``."""
    quad = jnp.einsum("ki,ij,kj->", W, Cxx, W, precision=HIGHEST)
    lin = jnp.einsum("ki,ki->", Cyx, W, precision=HIGHEST)
    return 0.5 * (quad - 2.0 * lin + Cyy)


def population_risk(W: jax.Array, W_star: jax.Array, sx: jax.Array, noise: jax.Array) -> jax.Array:
    """``L_mu(W) = 0.5 [tr((W - W*) Sx (W - W*)^T) + k nu^2]``; W ``(k, d)``."""
    delta = W - W_star
    return 0.5 * (jnp.sum(delta * delta * sx[None, :]) + W.shape[0] * noise**2)


def gap(W: jax.Array, Cxx, Cyx, Cyy, W_star, sx, noise) -> jax.Array:
    """``g_D(W) = L_mu(W) - Lhat_D(W)``."""
    return population_risk(W, W_star, sx, noise) - empirical_risk(W, Cxx, Cyx, Cyy)


def population_risk_np(W: np.ndarray, data: LinearData) -> np.ndarray:
    """``L_mu`` of a particle array ``(E, P, k, d)`` -> ``(E, P)`` (NumPy, float64)."""
    W = np.asarray(W, np.float64)
    delta = W - data.W_star
    return 0.5 * (np.einsum("epki,i,epki->ep", delta, data.sx, delta) + W.shape[-2] * data.noise**2)


def gap_np(W: np.ndarray, data: LinearData) -> np.ndarray:
    """``g_D`` of a particle array ``(E, P, k, d)`` -> ``(E, P)`` (NumPy, float64)."""
    W = np.asarray(W, np.float64)
    quad = np.einsum("epki,eij,epkj->ep", W, data.Cxx, W)
    lin = np.einsum("eki,epki->ep", data.Cyx, W)
    return population_risk_np(W, data) - 0.5 * (quad - 2.0 * lin + data.Cyy[:, None])
