"""The built-in CNN (kdsim/models/cnn.py): an NTK convnet on sequences and images against
NumPy, and a CNN teacher in a planted task."""

import jax
import jax.numpy as jnp
import numpy as np

import kdsim
from kdsim import langevin, models

D, K = 6, 3
CLS = {"task": {"name": "mlp_classification", "d": D, "n": 24, "n_test": 128, "num_classes": K},
       "teacher": {"num_steps": 30}, "student": {"alpha": 0.3},
       "num_datasets": 2, "num_particles": 8}


def test_builtin_cnn_is_an_ntk_convnet_on_sequences_and_images():
    cfg = kdsim.ModelConfig(kind="cnn", channels=2, kernel_size=3, depth=1, activation="relu")
    seq = models.builtin(cfg, 2, (7,))
    prep = models.prepare(seq, role="teacher_model", input_shape=(7,), out=2, dtype="float32")
    w = langevin.gaussian_like(jax.random.key(0), prep.structure.zeros(jnp.float32))
    x = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32)
    conv, dense = w["NTKConv_0"], w["NTKDense_0"]
    kern = np.asarray(conv["Conv_0"]["kernel"])                       # (3, 1, 2)
    padded = np.pad(x, ((0, 0), (1, 1)))
    pre = np.stack([sum(padded[:, j + t, None] * kern[t, 0][None] for t in range(3))
                    for j in range(7)], 1) / np.sqrt(3) + np.asarray(conv["bias"])
    pooled = np.maximum(pre, 0).mean(1)
    want = pooled @ np.asarray(dense["kernel"]) / np.sqrt(2) + np.asarray(dense["bias"])
    np.testing.assert_allclose(np.asarray(seq.apply(w, x)), want, rtol=1e-5, atol=1e-6)
    img = models.prepare(models.builtin(cfg, 10, (8, 8, 1)), role="teacher_model",
                         input_shape=(8, 8, 1), out=10, dtype="float32")
    assert img.structure.num_params == 3 * 3 * 1 * 2 + 2 + 2 * 10 + 10


def test_builtin_cnn_teacher_in_a_planted_task():
    cfg = {**CLS, "teacher": {"num_steps": 20, "model": {"kind": "cnn", "channels": 4}},
           "estimators": {"scratch": False}}
    run = kdsim.run_populations(cfg)
    assert run.models[0].name == "built-in cnn" and run.models[1].name == "built-in mlp"
    assert not run.resolved.girsanov and "parameter structure differs" in run.resolved.girsanov_reason
    kernel = run.populations.teacher["NTKConv_0"]["Conv_0"]["kernel"]
    assert kernel.shape == (2, 8, 3, 1, 4) and np.all(np.isfinite(kernel))
