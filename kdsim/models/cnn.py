"""The built-in CNN in the standard-normal ("NTK") parametrisation (SPEC §9).

``depth`` convolutions of ``channels`` filters of width ``kernel_size`` ("SAME"
padding, stride 1), each ``conv(h, W) / sqrt(fan_in) + b`` with
``fan_in = kernel_size^dims * in_channels`` and an activation, then global average
pooling over the spatial axes and an NTK dense read-out. Inputs are 1D sequences
``(m, length)`` or ``(m, length, channels)``, or 2D images ``(m, height, width, channels)``.
Every parameter has unit scale (``s_leaf = 1``), as for the MLP.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .mlp import ACTIVATIONS, NTKDense


class NTKConv(nn.Module):
    """Convolution ``conv(x, W) / sqrt(fan_in) + b`` over the axes between batch and channels."""

    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = x.ndim - 2
        window = (self.kernel_size,) * spatial
        conv = nn.Conv(self.features, window, padding="SAME", use_bias=False,
                       kernel_init=nn.initializers.zeros, dtype=x.dtype, param_dtype=x.dtype)
        fan_in = math.prod(window) * x.shape[-1]
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        bias = bias.reshape((1,) * (x.ndim - 1) + (self.features,))
        return conv(x) * (1.0 / jnp.sqrt(jnp.asarray(fan_in, x.dtype))) + bias


class CNN(nn.Module):
    """Conv layers, global average pooling, dense read-out: ``(m, ...) -> (m, out)``."""

    channels: int
    kernel_size: int
    depth: int
    out: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = x[..., None] if x.ndim == 2 else x          # a sequence without a channel axis
        for _ in range(self.depth):
            h = act(NTKConv(self.channels, self.kernel_size)(h))
        h = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
        return NTKDense(self.out)(h)
