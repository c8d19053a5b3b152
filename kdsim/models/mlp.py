"""The built-in MLP in the standard-normal ("NTK") parametrisation (SPEC §6, §9).

Every layer computes ``W h / sqrt(fan_in) + b`` with W, b of unit scale, so every
parameter has the prior ``N(0, s0^2)`` and the initial law ``N(0, s_init^2)`` of SPEC §2
(per-leaf scale ``s_leaf = 1``). The initialisers are zeros: kdsim draws the initial
particles itself from the scales, the module only fixes the parameter structure.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


class NTKDense(nn.Module):
    """``x @ W / sqrt(fan_in) + b``; input ``(..., fan_in)``, output ``(..., features)``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.zeros, (fan_in, self.features), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        bias = bias.reshape((1,) * (x.ndim - 1) + (self.features,))
        return x @ kernel * (1.0 / jnp.sqrt(jnp.asarray(fan_in, x.dtype))) + bias


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units, then a linear read-out of ``out`` units.

    Input ``(m, *input_shape)`` (flattened per example), output ``(m, out)``.
    """

    width: int
    depth: int
    out: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = x.reshape(x.shape[0], -1)
        for _ in range(self.depth):
            h = act(NTKDense(self.width)(h))
        return NTKDense(self.out)(h)
