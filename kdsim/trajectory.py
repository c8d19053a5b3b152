"""Per-step terms of the trajectory bounds (SPEC §10), for ONE particle; vmap outside.

A Langevin step ``w <- w - h grad U(w) + sqrt(2h) xi`` whose data term is
``gamma * grad Lhat`` moves to a Gaussian ``N(w - h grad U(w), 2h I)``. Two such kernels
whose data gradients differ by ``delta`` at the same pre-step state ``w`` are at KL

.. math:: \\mathrm{KL} = \\frac{\\|h \\gamma \\delta\\|^2}{2 \\cdot 2h} = \\frac{h \\gamma^2}{4} \\|\\delta\\|^2,

and by the chain rule for path KLs (Li, Luo & Qiao 2020, Lemma 10) the KL of two runs
with the same initial law is the sum over steps of the expectation, under the first
run, of that per-step KL. With ``g_i = grad l_i(w)`` the per-example gradients of the
phase's training objective (``l_i`` the task loss of example i for the teacher;
``alpha l_i + (1 - alpha) lkd_i`` against the frozen partner's soft label for the
student) and ``gbar = mean_i g_i`` (= ``grad Lhat_D``):

- leave-one-out (Negrea et al. 2019): ``delta = grad Lhat_D - grad Lhat_{D without z_J}
  = (g_J - gbar) / (n - 1)``;
- zero point (Li, Luo & Qiao 2020, Theorem 9: the prior process replaces z_J by a point
  of zero loss): ``delta = g_J / n``.

Each step adds ``(h gamma^2 / 4) * [E_J ||g_J - gbar||^2 / (n-1)^2, E_J ||g_J||^2 / n^2]``
to a particle's running sums (O(1) memory in steps), E_J the mean over all n choices of
J or over a sample of ``m`` of them per step (:func:`init`: unbiased, and independent
across particles, so the spread over particles includes the sampling noise and the
particle-level standard error stays honest). Per-example gradients come from
``jax.vmap(jax.grad(loss_i))`` over the examples: autodiff, for any model.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class TrajectoryAcc(NamedTuple):
    """Scan carry of one particle's trajectory sums."""

    sums: jax.Array    # (2,) [leave-one-out sum, zero-point sum] of (h gamma^2/4) E_J ||delta||^2
    start: jax.Array   # int32 [] first example of the next step's sample (unused with all n)


def init(keys: jax.Array, n: int, dtype) -> TrajectoryAcc:
    """Zero sums and a uniform random starting example per particle, for keys ``(E, P)``.

    A sampled step averages over the m consecutive examples ``start, ..., start + m - 1``
    (mod n) and the next step starts after them: each example is in a step's sample with
    probability exactly m/n (the start is uniform and independent of the chain), so every
    step's E_J is estimated without bias; the sample sweeps the dataset systematically
    (lower variance than independent draws) and costs no random numbers inside the scan.
    """
    E, P = keys.shape
    start = jax.vmap(lambda k: jax.random.randint(k, (), 0, n))(keys.reshape(-1))
    return TrajectoryAcc(jnp.zeros((E, P, 2), dtype), start.reshape(E, P).astype(jnp.int32))


def _sq_norms(tree: PyTree) -> jax.Array:
    """``(m,)`` squared norms of the m stacked pytrees (leading axis m of every leaf)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1) for x in leaves)


def step_terms(loss_i: Callable, w: PyTree, examples: PyTree, data_grad: PyTree | None,
               n: int, sample: jax.Array | None = None) -> jax.Array:
    """``[E_J ||g_J - gbar||^2 / (n-1)^2, E_J ||g_J||^2 / n^2]`` at ONE particle's state w.

    Args:
      loss_i: ``(w, example) -> scalar``, the phase's training objective on one example.
      examples: pytree of per-example arrays, leading axis n.
      data_grad: ``gbar = grad Lhat_D(w)`` (needed when ``sample`` is given; with all n
        it is the mean of the per-example gradients and may be None).
      sample: ``(m,)`` int indices of the examples J to average over (None: all n).
    Returns:
      ``(2,)``.
    """
    if sample is not None:
        examples = jax.tree_util.tree_map(lambda a: a[sample], examples)
    grads = jax.vmap(jax.grad(loss_i), in_axes=(None, 0))(w, examples)
    if data_grad is None:
        data_grad = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
    dev = jax.tree_util.tree_map(lambda g, gb: g - gb[None], grads, data_grad)
    # float: (n - 1)^2 as a Python int overflows int32 beyond n = 46341
    loo = jnp.mean(_sq_norms(dev)) / float(max(n - 1, 1)) ** 2   # n = 1: no leave-one-out (NaN later)
    zero = jnp.mean(_sq_norms(grads)) / float(n) ** 2
    return jnp.stack([loo, zero])


def build(loss_i: Callable, gamma, prior_grad: Callable, n: int, m: int):
    """The scan accumulator of one phase: ``(acc, pre_state, info, batch) -> acc``.

    Args:
      loss_i: ``(w, example) -> scalar`` per-example training objective (data term only).
      gamma: the phase's inverse temperature (traced).
      prior_grad: ``w -> grad`` of the prior term of the energy; the data gradient
        ``gbar = (grad U - prior_grad) / gamma`` is read off the step's own gradient,
        so a sampled step costs only its m per-example gradients.
      n: training points; m: examples per step (m = n: all of them, no sampling).
    The accumulator reads the per-example data from ``batch`` via :func:`examples_of`.
    """
    def accumulate(acc: TrajectoryAcc, pre, info, batch, examples) -> TrajectoryAcc:
        w = pre.position
        if m >= n:
            terms = step_terms(loss_i, w, examples, None, n)
            start = acc.start
        else:
            idx = (acc.start + jnp.arange(m, dtype=jnp.int32)) % n
            gbar = jax.tree_util.tree_map(lambda g, p: (g - p) / gamma, info.grad, prior_grad(w))
            terms = step_terms(loss_i, w, examples, gbar, n, idx)
            start = (acc.start + m) % n
        scale = 0.25 * info.step_size * gamma**2
        return TrajectoryAcc(acc.sums + (scale * terms).astype(acc.sums.dtype), start)

    return accumulate
