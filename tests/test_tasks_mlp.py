"""Planted neural tasks (kdsim/tasks/mlp.py): the planted network and the law of the labels."""

import jax.numpy as jnp
import numpy as np

from kdsim import streams
from kdsim.stats import bonferroni_z
from kdsim.tasks import mlp as mlp_task


def test_planted_network_and_classification_labels():
    root = streams.root_key(3)
    data = mlp_task.make_data(root, np.arange(2), n=4000, d=5, out=3, n_test=10, planted_width=16,
                              planted_scale=2.0, noise=0.5, classification=True)
    x = data.X[0]
    f = 2.0 * np.tanh(x @ data.B.T / np.sqrt(5)) @ data.A.T / np.sqrt(16)
    np.testing.assert_allclose(np.asarray(mlp_task.planted_function(jnp.asarray(x), jnp.asarray(data.A),
                                                                    jnp.asarray(data.B), 2.0)), f, rtol=1e-5, atol=1e-5)
    # y ~ Cat(softmax(f*)): class frequencies against the mean probabilities, by z-score
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[data.Y[0]]
    z = (onehot.mean(0) - p.mean(0)) / np.sqrt((p * (1 - p)).mean(0) / 4000)
    assert np.max(np.abs(z)) < bonferroni_z(3)
    assert abs(x.std() - 1.0) < 0.05
    reg = mlp_task.make_data(root, np.arange(1), n=4000, d=5, out=2, n_test=10, planted_width=16,
                             planted_scale=2.0, noise=0.5, classification=False)
    f2 = 2.0 * np.tanh(reg.X[0] @ reg.B.T / np.sqrt(5)) @ reg.A[:2].T / np.sqrt(16)
    resid = reg.Y[0] - f2                          # the NumPy planted function, not kdsim's
    # y = f* + 0.5 eps: residual sd 0.5 within 4 of its standard errors (0.5 / sqrt(2 * 8000))
    assert abs(resid.std() - 0.5) < 4 * 0.5 / np.sqrt(2 * resid.size)
    assert abs(resid.mean()) < 4 * 0.5 / np.sqrt(resid.size)
