"""Fixed-order arithmetic: sums and matrix products whose rounding does not depend on
the batch they are computed in.

Why: under vmap, XLA hands a whole population to one matmul or reduction kernel and
picks the kernel, and with it each particle's summation order, by the batch's shape
(``benchmarks/results/batch_invariance.md``). A population split over devices, chunks
or processes would then differ in the last bit from the whole run, although its random
draws are the same. Here every sum is one chain ``((t_0 + t_1) + t_2) + ...`` over the
contracted index, written elementwise for ONE particle, so each particle's result is the
same in any batch of two or more particles.

Chains up to :data:`UNROLL_MAX` terms are unrolled (XLA fuses them into one loop, the
accumulator stays in registers); longer ones run as a rolled loop over blocks of
:data:`BLOCK` terms that continues the same chain, so the result does not depend on
which of the two forms computed it (zero padding of the last block adds exact zeros).

Functions are written for ONE particle; vmap them over a population.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

UNROLL_MAX = 128
BLOCK = 64


def _chain(term: Callable[[jax.Array], jax.Array], length: int, pad: Callable[[int], Callable],
           op: Callable = jnp.add):
    """``term(0) + term(1) + ... + term(length - 1)``, left to right (``op`` for ``+``).

    ``term(j)`` takes a static int (unrolled form) or a traced index into operands
    padded by ``pad(total)`` (rolled form: ``pad`` returns the term function over the
    zero-padded operands)."""
    if length <= UNROLL_MAX:
        acc = term(0)
        for j in range(1, length):
            acc = op(acc, term(j))
        return acc
    blocks = -(-length // BLOCK)
    padded = pad(blocks * BLOCK)
    acc = term(0)
    for j in range(1, BLOCK):
        acc = op(acc, padded(j))

    def body(b, acc):
        for j in range(BLOCK):
            acc = op(acc, padded(b * BLOCK + j))
        return acc

    return jax.lax.fori_loop(1, blocks, body, acc)


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _take(x: jax.Array, j, axis: int, keepdims: bool = False) -> jax.Array:
    if isinstance(j, int):
        return jax.lax.index_in_dim(x, j, axis, keepdims=keepdims)
    return jax.lax.dynamic_index_in_dim(x, j, axis, keepdims=keepdims)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` as a fixed-order chain over the contracted index.

    Shapes: a ``(..., m, K)``, b ``(K, N)`` -> ``(..., m, N)``.
    """
    K = b.shape[0]
    if a.shape[-1] != K:
        raise ValueError(f"contracted dimensions differ: {a.shape} @ {b.shape}")

    def over(a, b):
        row = lambda j: _take(b, j, 0).reshape((1,) * (a.ndim - 1) + (-1,))
        return lambda j: _take(a, j, a.ndim - 1, keepdims=True) * row(j)

    return _chain(over(a, b), K, lambda size: over(_pad_axis(a, a.ndim - 1, size), _pad_axis(b, 0, size)))


def sum(x: jax.Array, axis: int = 0) -> jax.Array:  # noqa: A001 - mirrors jnp.sum
    """Sum over one axis as a fixed-order chain (the axis is removed)."""
    axis = axis % x.ndim
    over = lambda x: (lambda j: _take(x, j, axis))
    return _chain(over(x), x.shape[axis], lambda size: over(_pad_axis(x, axis, size)))


def max(x: jax.Array, axis: int = -1) -> jax.Array:  # noqa: A001 - mirrors jnp.max
    """Maximum over one (short) axis as a chain of elementwise maxima.

    The maximum is exact in any order; the chain is about fusion: measured on CPU, a
    reduce-max feeding ``exp(f - max)`` made XLA fuse and vectorise the exp per batch
    shape, and its last bits changed with the batch."""
    axis = axis % x.ndim
    over = lambda x: (lambda j: _take(x, j, axis))
    return _chain(over(x), x.shape[axis], lambda size: over(_pad_axis(x, axis, size, -jnp.inf)),
                  jnp.maximum)


def total(x: jax.Array) -> jax.Array:
    """Sum of all elements: the last axis first, then the next, in fixed order."""
    for _ in range(x.ndim):
        x = sum(x, axis=-1)
    return x
