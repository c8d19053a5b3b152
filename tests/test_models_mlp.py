"""The built-in MLP (kdsim/models/mlp.py): NTK layers against NumPy, and the initial law
the engine draws for it."""

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from kdsim import models

from helpers import builtin_model, initial_draws


def test_ntk_layers_and_initial_law():
    model, prep = builtin_model()
    assert prep.num_params == 5 * 6 + 6 + 6 * 6 + 6 + 6 * 3 + 3
    assert prep.scales == (1.0,) * 6 and prep.scale_source == models.UNIT
    draws = initial_draws(prep, 400)
    params = jax.tree_util.tree_map(lambda x: x[0], draws)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    h = x
    for name in ("NTKDense_0", "NTKDense_1"):
        layer = params[name]
        h = np.tanh(h @ np.asarray(layer["kernel"]) / np.sqrt(h.shape[1]) + np.asarray(layer["bias"]))
    last = params["NTKDense_2"]
    out = h @ np.asarray(last["kernel"]) / np.sqrt(6) + np.asarray(last["bias"])
    np.testing.assert_allclose(np.asarray(model.apply(params, x)), out, rtol=1e-5, atol=1e-6)
    # every parameter N(0, s_init^2): pooled over many draws
    v = np.asarray(ravel_pytree(draws)[0])
    assert abs(v.mean()) < 4 * 0.7 / np.sqrt(v.size)
    assert abs(v.var() / 0.49 - 1) < 4 * np.sqrt(2 / v.size)
