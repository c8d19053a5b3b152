"""Flax MLPs in the standard-normal ("NTK") parametrisation (SPEC §6).

Every layer computes ``W h / sqrt(fan_in) + b``, so every parameter has the same prior
``N(0, s0^2)`` and the same initial law ``N(0, s_init^2)`` as the linear model: the
Langevin dynamics of SPEC §2 apply to the plain parameter pytree unchanged.

Modules are used functionally: ``model.apply({"params": params}, x)``; parameters are
plain pytrees, initialised here as standard normal draws from an explicit key (the
flax initialisers are never used), so an ensemble is a vmapped :func:`init_params`.

The Langevin engine does not call the flax module: :func:`forward` and :func:`backward`
compute the same network and its parameter gradient with :mod:`kdsim.ordered`
arithmetic, so a particle's gradient is bit for bit the same whatever the batch (device,
chunk or process) it is computed in. The flax module serves evaluation and is the
reference the hand-written pass is tested against.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import ordered
from .langevin import gaussian_like

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}

Params = Any


class NTKDense(nn.Module):
    """``x @ W / sqrt(fan_in) + b`` with W, b of unit scale."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.zeros, (fan_in, self.features), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        bias = bias.reshape((1,) * (x.ndim - 1) + (self.features,))
        return x @ kernel / jnp.sqrt(jnp.asarray(fan_in, x.dtype)) + bias


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units, then a linear read-out of ``out`` units.

    Input ``(..., d)``, output ``(..., out)``.
    """

    width: int
    depth: int
    out: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = x
        for _ in range(self.depth):
            h = act(NTKDense(self.width)(h))
        return NTKDense(self.out)(h)


def param_template(model: MLP, d: int, dtype=jnp.float32) -> Params:
    """Shapes and dtypes of the parameter pytree (no computation)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, d), dtype)))
    return shapes["params"]


def init_params(key: jax.Array, template: Params, scale: jax.Array) -> Params:
    """``N(0, scale^2)`` draws of every parameter (one key per particle)."""
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)
    return jax.tree_util.tree_map(lambda z: scale * z, gaussian_like(key, zeros))


def num_params(template: Params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(template)))


def sq_norm(params: Params) -> jax.Array:
    return sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------------------
# the engine's forward and backward passes (fixed-order arithmetic, ONE particle)


class Cache(NamedTuple):
    """What :func:`backward` needs from :func:`forward`: each layer's input and each
    hidden layer's pre-activation (lists of ``(n, fan_in)`` and ``(n, width)``)."""

    inputs: list
    pre: list


def _layer_names(params: Params) -> list[str]:
    names = sorted(params, key=lambda name: int(name.rsplit("_", 1)[1]))
    if any(not name.startswith("NTKDense_") for name in names):
        raise ValueError(f"not an MLP parameter tree (layers {sorted(params)})")
    return names


def _dense(x: jax.Array, layer) -> jax.Array:
    fan_in = x.shape[-1]
    return ordered.matmul(x, layer["kernel"]) / jnp.sqrt(jnp.asarray(fan_in, x.dtype)) + layer["bias"][None]


def forward(params: Params, X: jax.Array, activation: str) -> tuple[jax.Array, Cache]:
    """The network of :class:`MLP` on inputs ``(n, d)`` -> predictions ``(n, out)`` and
    the cache for :func:`backward`."""
    act = ACTIVATIONS[activation]
    names = _layer_names(params)
    h, inputs, pre = X, [], []
    for name in names[:-1]:
        inputs.append(h)
        z = _dense(h, params[name])
        pre.append(z)
        h = act(z)
    inputs.append(h)
    return _dense(h, params[names[-1]]), Cache(inputs, pre)


def apply(params: Params, X: jax.Array, activation: str) -> jax.Array:
    """Predictions ``(n, out)`` of :func:`forward`."""
    return forward(params, X, activation)[0]


def backward(params: Params, cache: Cache, g_out: jax.Array, activation: str) -> Params:
    """The parameter gradient (vjp) of :func:`forward` for the output cotangent
    ``g_out`` ``(n, out)``; every sum over the data or the units is a fixed-order chain."""
    act = ACTIVATIONS[activation]
    names = _layer_names(params)
    grads, g = {}, g_out
    for i in reversed(range(len(names))):
        layer, a = params[names[i]], cache.inputs[i]
        scale = jnp.sqrt(jnp.asarray(a.shape[-1], a.dtype))
        grads[names[i]] = {"kernel": ordered.matmul(a.T, g) / scale, "bias": ordered.sum(g, 0)}
        if i:
            z = cache.pre[i - 1]
            slope = jax.jvp(act, (z,), (jnp.ones_like(z),))[1]
            g = ordered.matmul(g, layer["kernel"].T) / scale * slope
    return {name: grads[name] for name in names}
