"""Unadjusted Langevin dynamics (Euler--Maruyama), for ONE particle; vmap outside.

The chain targets ``p(w) ∝ exp(-U(w))``:

.. math::

    w_{t+1} = w_t - h_t \\nabla U(w_t) + \\sqrt{2 h_t}\\, \\xi_t, \\qquad \\xi_t \\sim N(0, I).

Built like a BlackJAX kernel: :func:`build_kernel` closes over the energy gradient and
the step-size schedule and returns a :class:`LangevinKernel` of two pure functions,
``init(position) -> LangevinState`` and ``step(key, state, t, batch) -> (state, info)``.
:func:`run` advances a state over a range of global step indices with ``lax.scan``,
drawing step ``t``'s noise from ``fold_in(key, t)`` (see :mod:`kdsim.streams`), so a
run split into segments is bit-identical to the unsplit run.

A chain whose position stops being finite is *diverged*: the flag is sticky, the step
is recorded, and the position is frozen at its last finite value so NaN cannot spread
into anything computed from it. Estimators exclude diverged particles (and their pairs).

A chain can also blow up without ever overflowing: in float64 an unstable linear chain
grows like ``|1 - h lambda_max|^T`` (1e130 after 200 steps) and stays finite. So a
kernel may also be given an *escape test* (:func:`region_test`): a chain is diverged
as soon as its prior-normalised squared norm

.. math::

    R(w) = \\sum_\\ell \\frac{\\|w_\\ell\\|^2}{s_0^2 s_\\ell^2}

(sum over parameter leaves, ``s_ell`` the leaf's prior scale, 1 for the built-in
models) exceeds :func:`escape_limit`,

.. math::

    R_{\\max} = 10^{8} \\cdot D \\cdot \\max\\big(1,\\ (s_{init}/s_0)^2,\\ \\gamma s_0^2 \\max_\\ell s_\\ell^2\\big),

``D`` the number of parameters. Why no healthy chain reaches it:

- under the prior ``R ~ chi^2_D`` and under the initial law ``R ~ (s_init/s0)^2 chi^2_D``;
  by the Laurent--Massart bound ``P(chi^2_D > D + 2 sqrt(D x) + 2x) <= e^{-x}``, exceeding
  ``10^8 D`` has probability below ``exp(-10^7)``;
- the posterior's spread is at most the prior's (its precision ``gamma H + I/s0^2``
  dominates ``I/s0^2`` wherever the loss is convex), but its mean can sit far outside the
  prior: for a linear model one coordinate's posterior mean is
  ``gamma b_i / (gamma lambda_i + 1/s0^2)`` with ``b_i^2 <= lambda_i E[y^2]`` (Cauchy--Schwarz),
  so ``m_i^2 / s0^2 <= gamma s0^2 E[y^2] / 4`` whatever the data's spectrum, and
  ``R(mean) <= D gamma s0^2 E[y^2] / 4``. A stable chain moves from the initial law to
  the posterior without overshooting either.

So a healthy chain stays below ``D max(...) (E[y^2] + a few)``, and the factor ``10^8``
leaves room for targets up to ``10^4`` times the unit scale (squared: ``10^8``) and for
non-convex losses, while a blown-up float64 chain crosses it within a few dozen steps
of its instability. The flag is decided by a comparison, so the exact rounding of ``R``
never matters except for a chain within one ulp of the limit.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import streams

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]


class LangevinState(NamedTuple):
    """Scan carry of one chain."""

    position: PyTree          # parameters, any pytree of arrays
    diverged: jax.Array       # bool [] sticky: the position stopped being finite (or escaped)
    diverged_step: jax.Array  # int32 [] first diverged step, -1 while healthy


class LangevinInfo(NamedTuple):
    """Per-step diagnostics (scan output; never fed back)."""

    step_size: jax.Array      # [] h_t
    grad: PyTree              # grad U at the pre-step position
    aux: Any = None           # what a ``has_aux`` energy gradient returned besides grad


class LangevinKernel(NamedTuple):
    init: Callable[[PyTree], LangevinState]
    step: Callable[[jax.Array, LangevinState, jax.Array, Any], tuple[LangevinState, LangevinInfo]]
    update: Callable[[LangevinState, PyTree, jax.Array, Any], tuple[LangevinState, LangevinInfo]]


POLYNOMIAL_POWER = 0.55      # the SGLD literature's h_t = a (b + t)^(-0.55)


def schedule(kind: str, step_size, num_steps: int, offset=100.0) -> Schedule:
    """Step sizes ``t -> h_t`` (optax schedules: functions of the global step count).

    - ``constant``: ``h_t = h``;
    - ``polynomial``: ``h_t = h (b / (b + t))^0.55``, i.e. ``a (b + t)^(-0.55)`` with ``a``
      chosen so that ``h_0 = h`` (``b = offset``);
    - ``cosine``: ``optax.cosine_decay_schedule`` from ``h`` to 0 over ``num_steps``.

    ``step_size`` and ``offset`` may be traced; ``num_steps`` is the phase's length.
    """
    if kind == "constant":
        return optax.constant_schedule(step_size)
    if kind == "polynomial":
        return lambda t: step_size * (offset / (offset + t)) ** POLYNOMIAL_POWER
    if kind == "cosine":
        return optax.cosine_decay_schedule(step_size, max(int(num_steps), 1))
    raise ValueError(f"unknown step-size schedule {kind!r}")


def step_sizes(kind: str, step_size: float, num_steps: int, offset: float = 100.0) -> np.ndarray:
    """``(h_0, ..., h_{T-1})`` of :func:`schedule` in float64 (for the closed forms)."""
    with jax.enable_x64(True):
        fn = schedule(kind, jnp.float64(step_size), num_steps, jnp.float64(offset))
        hs = jax.vmap(fn)(jnp.arange(num_steps, dtype=jnp.float64))
        return np.asarray(jnp.broadcast_to(hs, (num_steps,)), np.float64)


def gaussian_like(key: jax.Array, tree: PyTree) -> PyTree:
    """Standard normal draws with the structure, shapes and dtypes of ``tree``.

    One flat draw of ``sum(leaf sizes)`` numbers from ``key``, split into the leaves in
    tree order: one random-number call per particle and step whatever the model, which
    is also what keeps a vmapped ensemble fast to compile.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
    flat = streams.normal(key, (sum(sizes),), jnp.result_type(*leaves))
    offsets = np.cumsum([0] + sizes)
    draws = [flat[a:b].reshape(jnp.shape(x)).astype(jnp.result_type(x))
             for a, b, x in zip(offsets[:-1], offsets[1:], leaves)]
    return jax.tree_util.tree_unflatten(treedef, draws)


def _all_finite(tree: PyTree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


ESCAPE_MARGIN = 1e8   # see the module docstring: far above any healthy chain


def prior_normalised_sq_norm(position: PyTree, prior_scale: jax.Array,
                             leaf_scales: PyTree | None = None) -> jax.Array:
    """``R(w) = sum_leaf ||w_leaf||^2 / (s0^2 s_leaf^2)`` of ONE particle, a scalar.

    Args:
      position: the particle's parameter pytree.
      prior_scale: s0 (traced scalar).
      leaf_scales: a pytree of scalars s_leaf with the structure of ``position``
        (None: all ones, the built-in models and the linear task).
    """
    leaves = jax.tree_util.tree_leaves(position)
    scales = [1.0] * len(leaves) if leaf_scales is None else jax.tree_util.tree_leaves(leaf_scales)
    inv = 1.0 / jnp.asarray(prior_scale) ** 2
    total = 0.0
    for w, s in zip(leaves, scales):
        total = total + jnp.sum(w * w) * (inv / jnp.asarray(s, jnp.result_type(w)) ** 2)
    return jnp.asarray(total)


def escape_limit(template: PyTree, gamma: jax.Array, prior_scale: jax.Array,
                 init_scale: jax.Array, leaf_scales: PyTree | None = None,
                 margin: float = ESCAPE_MARGIN) -> jax.Array:
    """Largest prior-normalised squared norm a healthy chain may reach (module docstring):

    .. math:: R_{\\max} = \\mathrm{margin} \\cdot D \\cdot
              \\max(1, (s_{init}/s_0)^2, \\gamma s_0^2 \\max_\\ell s_\\ell^2)

    Args:
      template: ONE particle's parameter pytree (only the leaf sizes are used: D).
      gamma, prior_scale, init_scale: the chain's gamma, s0 and s_init (traced scalars).
      leaf_scales: pytree of s_leaf (None: all ones).
    Returns:
      a scalar in the dtype of the template's leaves.
    """
    leaves = jax.tree_util.tree_leaves(template)
    dim = sum(int(np.prod(jnp.shape(x))) for x in leaves)
    dtype = jnp.result_type(*leaves)
    s_max = 1.0 if leaf_scales is None else jnp.max(jnp.stack(
        [jnp.asarray(s, dtype) for s in jax.tree_util.tree_leaves(leaf_scales)]))
    gamma, s0, s_init = (jnp.asarray(x, dtype) for x in (gamma, prior_scale, init_scale))
    worst = jnp.maximum(jnp.maximum(1.0, (s_init / s0) ** 2), gamma * s0**2 * s_max**2)
    return (margin * max(dim, 1) * worst).astype(dtype)


def region_test(prior_scale: jax.Array, limit: jax.Array,
                leaf_scales: PyTree | None = None) -> Callable[[PyTree], jax.Array]:
    """Escape test for :func:`build_kernel`: ``position -> bool []``, True when
    ``R(position) > limit`` or R is not finite (NaN compares False, so it escapes)."""
    def escaped(position: PyTree) -> jax.Array:
        return ~(prior_normalised_sq_norm(position, prior_scale, leaf_scales) <= limit)
    return escaped


def build_kernel(grad_energy: Callable[[PyTree, Any], PyTree], schedule: Schedule,
                 has_aux: bool = False,
                 escaped: Callable[[PyTree], jax.Array] | None = None) -> LangevinKernel:
    """Euler--Maruyama Langevin kernel.

    Args:
      grad_energy: ``(position, batch) -> grad U(position)``, same pytree as position;
        with ``has_aux``, ``-> (grad, aux)`` and ``aux`` is passed on in the info.
      schedule: ``t -> h_t`` (int32 global step index to step size).
      escaped: optional ``position -> bool []`` (e.g. :func:`region_test`): a proposal
        for which it is True diverges the chain exactly as a non-finite one does (the
        position is frozen at its last value, the step recorded).
    Returns:
      a :class:`LangevinKernel`; ``kernel.update(state, noise, t, batch)`` is the step
      with its standard normal ``noise`` given (``step`` draws it from ``key``).
    """

    def init(position: PyTree) -> LangevinState:
        return LangevinState(position, jnp.asarray(False), jnp.asarray(-1, jnp.int32))

    def update(state: LangevinState, noise: PyTree, t: jax.Array,
               batch: Any = None) -> tuple[LangevinState, LangevinInfo]:
        h = schedule(t)
        grad, aux = grad_energy(state.position, batch) if has_aux else \
            (grad_energy(state.position, batch), None)
        scale = jnp.sqrt(2.0 * h)
        proposal = jax.tree_util.tree_map(
            lambda w, g, xi: (w - h * g + scale * xi).astype(w.dtype),
            state.position, grad, noise)
        blew_up = ~_all_finite(proposal)
        if escaped is not None:
            blew_up = blew_up | escaped(proposal)
        newly = blew_up & ~state.diverged
        diverged = state.diverged | blew_up
        position = jax.tree_util.tree_map(
            lambda new, old: jnp.where(diverged, old, new), proposal, state.position)
        diverged_step = jnp.where(newly, jnp.asarray(t, jnp.int32), state.diverged_step)
        return LangevinState(position, diverged, diverged_step), LangevinInfo(h, grad, aux)

    def step(key: jax.Array, state: LangevinState, t: jax.Array,
             batch: Any = None) -> tuple[LangevinState, LangevinInfo]:
        return update(state, gaussian_like(key, state.position), t, batch)

    return LangevinKernel(init, step, update)


def run(kernel: LangevinKernel, key: jax.Array, state: LangevinState, start: int, num_steps: int,
        batch: Any = None, accumulate: Callable[[Any, LangevinState, LangevinInfo], Any] | None = None,
        acc_init: Any = None) -> tuple[LangevinState, Any]:
    """Advance one chain over global steps ``start, ..., start + num_steps - 1``.

    Args:
      key: the particle's noise key; step ``t`` uses ``fold_in(key, t)``.
      accumulate: optional ``(acc, pre_state, info) -> acc`` folded along the run
        (e.g. the Girsanov path-space divergence), evaluated at each pre-step state.
    Returns:
      ``(final_state, acc)``; no per-step arrays are kept (memory stays O(1) in steps).
    """

    def body(carry, t):
        st, acc = carry
        new, info = kernel.step(streams.step_key(key, t), st, t, batch)
        if accumulate is not None:
            acc = accumulate(acc, st, info)
        return (new, acc), None

    ts = jnp.asarray(start, jnp.int32) + jnp.arange(num_steps, dtype=jnp.int32)
    (state, acc), _ = jax.lax.scan(body, (state, acc_init), ts)
    return state, acc


def run_population(kernel: LangevinKernel, keys: jax.Array, state: LangevinState, start: int,
                   num_steps: int, batch: Any = None, particle_batch: Any = None,
                   accumulate: Callable[[Any, LangevinState, LangevinInfo, Any], Any] | None = None,
                   acc_init: Any = None) -> tuple[LangevinState, Any]:
    """Advance a population ``(E, P)`` of chains: identical, chain by chain, to :func:`run`.

    Args:
      keys: ``(E, P)`` particle noise keys.
      state: a :class:`LangevinState` whose leaves have leading axes ``(E, P)``.
      batch: per-dataset pytree with leading axis E (shared by the P particles).
      particle_batch: per-particle pytree with leading axes ``(E, P)``; the kernel's
        energy gradient receives ``(batch, particle_batch)`` of one particle.
      accumulate: ``(acc, pre_state, info, (batch, particle_batch)) -> acc`` for ONE particle.
      acc_init: per-particle accumulators, leading axes ``(E, P)``.

    The noise of each step is drawn over the flattened ``E * P`` axis (one ``vmap`` of
    the same ``fold_in(key, t)`` draw :func:`run` makes): the numbers are the same, and
    a single batch axis around the RNG compiles several times faster than two.
    """
    E, P = keys.shape
    flat_keys = keys.reshape(-1)
    template = jax.tree_util.tree_map(lambda x: x[0, 0], state.position)

    def one(st, noise, t, b, pb):
        return kernel.update(st, noise, t, (b, pb))

    update = jax.vmap(jax.vmap(one, in_axes=(0, 0, None, None, 0)), in_axes=(0, 0, None, 0, 0))
    if accumulate is not None:
        acc_one = lambda acc, st, info, b, pb: accumulate(acc, st, info, (b, pb))
        acc_fn = jax.vmap(jax.vmap(acc_one, in_axes=(0, 0, 0, None, 0)), in_axes=(0, 0, 0, 0, 0))

    def body(carry, t):
        st, acc = carry
        step_keys = jax.vmap(lambda k: streams.step_key(k, t))(flat_keys)
        noise = jax.vmap(lambda k: gaussian_like(k, template))(step_keys)
        noise = jax.tree_util.tree_map(lambda x: x.reshape((E, P) + x.shape[1:]), noise)
        new, info = update(st, noise, t, batch, particle_batch)
        if accumulate is not None:
            acc = acc_fn(acc, st, info, batch, particle_batch)
        return (new, acc), None

    ts = jnp.asarray(start, jnp.int32) + jnp.arange(num_steps, dtype=jnp.int32)
    (state, acc), _ = jax.lax.scan(body, (state, acc_init), ts)
    return state, acc
