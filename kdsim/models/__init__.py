"""Models: the protocol (:mod:`.protocol`) and the built-in flax modules (:mod:`.mlp`,
:mod:`.cnn`), chosen by ``model.kind`` in the config."""

from __future__ import annotations

from functools import lru_cache

from .cnn import CNN
from .mlp import ACTIVATIONS, MLP, NTKDense
from .protocol import (UNIT, Model, ModelError, Prepared, Structure, as_model, from_linen,
                       from_nnx, prepare, same_structure)

__all__ = ["ACTIVATIONS", "CNN", "MLP", "Model", "ModelError", "NTKDense", "Prepared",
           "Structure", "UNIT", "as_model", "builtin", "from_linen", "from_nnx", "prepare",
           "same_structure"]


@lru_cache(maxsize=256)
def _builtin(kind: str, width: int, depth: int, activation: str, channels: int,
             kernel_size: int, out: int, input_shape: tuple, dtype: str) -> Model:
    if kind == "cnn":
        module = CNN(channels, kernel_size, depth, out, activation)
    else:
        module = MLP(width, depth, out, activation)
    model = from_linen(module, input_shape, dtype, scales=UNIT)
    return model._replace(name=f"built-in {kind}")


def builtin(cfg, out: int, input_shape: tuple, dtype: str = "float32") -> Model:
    """The built-in model a ``ModelConfig`` describes (cached: one Model per description,
    so runs of the same config reuse their compiled programs)."""
    return _builtin(cfg.kind, cfg.width, cfg.depth, cfg.activation, cfg.channels,
                    cfg.kernel_size, out, tuple(input_shape), str(dtype))
