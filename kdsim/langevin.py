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
    diverged: jax.Array       # bool [] sticky: the position stopped being finite
    diverged_step: jax.Array  # int32 [] first non-finite step, -1 while finite


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


def build_kernel(grad_energy: Callable[[PyTree, Any], PyTree], schedule: Schedule,
                 has_aux: bool = False) -> LangevinKernel:
    """Euler--Maruyama Langevin kernel.

    Args:
      grad_energy: ``(position, batch) -> grad U(position)``, same pytree as position;
        with ``has_aux``, ``-> (grad, aux)`` and ``aux`` is passed on in the info.
      schedule: ``t -> h_t`` (int32 global step index to step size).
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
