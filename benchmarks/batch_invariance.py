"""Does a particle's float32 result depend on how many particles share the batch?

The question behind "states bitwise equal to the single-device run": a population split
over devices or chunks computes each particle in a smaller batch. Per-particle random
streams make the draws identical, but the arithmetic is compiled by XLA per batch shape.
This script computes, for a population of 4,096 particles and for sub-batches of it,
the per-particle product ``W @ C`` (``W`` of shape ``(k, d)``, ``C`` of shape
``(d, d)``) three ways and reports whether each particle's result is bit for bit the
same in every batch:

- ``matmul``: ``jnp.matmul`` under vmap (XLA merges the population into one matmul and
  picks its kernel, and each row's summation order, by the shape);
- ``chain``: :func:`kdsim.ordered.matmul`, the engine's per-particle multiply-add
  chain;
- ``mlp bias grad``: the gradient of an MLP's first-layer bias (a reduction over the
  data), through autodiff (what the MLP engine did before kdsim.ordered) and through
  the engine's fixed-order backward pass (:func:`kdsim.models.backward`).

Run: ``python benchmarks/batch_invariance.py`` (writes
``benchmarks/results/batch_invariance.md``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from kdsim import models, ordered

HERE = os.path.dirname(os.path.abspath(__file__))
POPULATION = 4096
BATCHES = (1, 3, 16, 64, 1000)


def _invariant(fn, *population) -> str:
    """'yes' if every sub-batch reproduces the whole population's rows bit for bit."""
    f = jax.jit(fn)
    whole = np.asarray(f(*population))
    bad = [b for b in BATCHES if not np.array_equal(np.asarray(f(*(x[:b] for x in population))), whole[:b])]
    return "yes" if not bad else "no (batches " + ", ".join(map(str, bad)) + ")"


def _mlp_bias_grad(n: int, d: int, width: int):
    X = jnp.asarray(np.random.default_rng(1).normal(size=(n, d)), jnp.float32)

    def loss(params):
        W1, b1, w2 = params
        return jnp.sum(jnp.tanh(X @ W1 + b1) @ w2)

    return jax.vmap(lambda W1, b1, w2: jax.grad(loss)((W1, b1, w2))[1])


def _mlp_bias_grad_engine(n: int, d: int, width: int):
    """The same gradient through the engine's forward/backward passes (kdsim.models)."""
    X = jnp.asarray(np.random.default_rng(1).normal(size=(n, d)), jnp.float32)

    def grad(W1, b1, w2):
        params = {"NTKDense_0": {"kernel": W1, "bias": b1}, "NTKDense_1": {"kernel": w2[:, None],
                                                                            "bias": jnp.zeros((1,), w2.dtype)}}
        f, cache = models.forward(params, X, "tanh")
        return models.backward(params, cache, jnp.ones_like(f), "tanh")["NTKDense_0"]["bias"]

    return jax.vmap(grad)


def main() -> None:
    rng = np.random.default_rng(0)
    lines = [f"# Batch invariance of float32 per-particle arithmetic ({jax.devices()[0].device_kind}, "
             f"JAX {jax.__version__})", "",
             f"A population of {POPULATION} particles; each sub-batch of the first b particles "
             f"(b in {', '.join(map(str, BATCHES))}) is computed on its own and compared bit for bit "
             "with the same particles' rows in the whole population.", "",
             "| computation | shape per particle | bit-identical in every batch |", "|---|---|---|"]
    for d, k in ((4, 2), (8, 2), (32, 4)):
        W = jnp.asarray(rng.normal(size=(POPULATION, k, d)), jnp.float32)
        C = jnp.asarray(rng.normal(size=(d, d)), jnp.float32)
        lines.append(f"| matmul (jnp, vmapped) | ({k}, {d}) @ ({d}, {d}) | "
                     f"{_invariant(jax.vmap(lambda w: w @ C), W)} |")
        lines.append(f"| chain (kdsim engine) | ({k}, {d}) @ ({d}, {d}) | "
                     f"{_invariant(jax.vmap(lambda w: ordered.matmul(w, C)), W)} |")
    for width in (16, 64):
        n, d = 64, 8
        W1 = jnp.asarray(rng.normal(size=(POPULATION, d, width)), jnp.float32)
        b1 = jnp.asarray(rng.normal(size=(POPULATION, width)), jnp.float32)
        w2 = jnp.asarray(rng.normal(size=(POPULATION, width)), jnp.float32)
        lines.append(f"| MLP first-layer bias gradient (autodiff) | n = {n}, d = {d}, width {width} | "
                     f"{_invariant(_mlp_bias_grad(n, d, width), W1, b1, w2)} |")
        lines.append(f"| MLP first-layer bias gradient (kdsim engine) | n = {n}, d = {d}, width {width} | "
                     f"{_invariant(_mlp_bias_grad_engine(n, d, width), W1, b1, w2)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(HERE, "results", "batch_invariance.md")
    with open(out, "w") as fh:
        fh.write(text)
    print(f"written {out}")


if __name__ == "__main__":
    main()
