"""Data sources (kdsim/tasks/sources.py): class selection and relabelling, pools from
.npz files, the data extra named when missing, MNIST-1D generated without touching the
global random state."""

import random
import sys

import numpy as np
import pytest

import kdsim
from kdsim.config import parse_toml
from kdsim.tasks import sources


def _user_pool(N=40, shape=(5,), K=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N,) + shape).astype(np.float32), rng.integers(0, K, N)


def test_classes_selection_npz_and_missing_extra(tmp_path, monkeypatch):
    X, Y = _user_pool(N=60, K=4)
    task = kdsim.SimConfig.from_dict({"task": {"name": "pool", "source": "arrays",
                                               "classes": [3, 1]}}).task
    pool = sources.load(task, (X, Y))
    keep = np.isin(Y, [3, 1])
    np.testing.assert_array_equal(pool.X, X[keep])
    np.testing.assert_array_equal(pool.Y, np.where(Y[keep] == 3, 0, 1))
    assert pool.num_classes == 2
    # the CLI's pool: an .npz file named by task.path
    path = tmp_path / "pool.npz"
    np.savez(path, X=X, Y=Y)
    cfg = kdsim.SimConfig.from_dict({"task": {"name": "pool", "source": "arrays", "path": str(path)}})
    from_file = sources.load(cfg.task)
    assert from_file.digest == sources.validate(X, Y, classification=True).digest
    assert kdsim.SimConfig.from_dict(parse_toml(cfg.to_toml())) == cfg
    np.savez(tmp_path / "noY.npz", X=X)
    with pytest.raises(kdsim.DataError, match="has no array\\(s\\) \\['Y'\\]"):
        sources.load(cfg.replace({"task.path": str(tmp_path / "noY.npz")}).task)
    # without the data extra: one error naming it
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setattr(sources, "_digits_raw", sources._digits_raw.__wrapped__)
    with pytest.raises(kdsim.DataError, match='pip install "kdsim\\[data\\]"'):
        kdsim.simulate({"task": {"name": "pool", "source": "digits"}})


def test_mnist1d_pool_leaves_global_random_state_alone():
    np.random.seed(123)
    random.seed(9)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    X, Y = sources.builtin("mnist1d")
    assert X.shape == (5000, 40) and Y.shape == (5000,) and set(np.unique(Y)) == set(range(10))
    np.testing.assert_array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py
    task = kdsim.SimConfig.from_dict({"task": {"name": "pool", "source": "mnist1d",
                                               "classes": [4, 9]}}).task
    pool = sources.load(task)
    assert pool.input_shape == (40,) and pool.num_classes == 2 and pool.size == int(np.isin(Y, [4, 9]).sum())
    np.testing.assert_allclose([pool.X.mean(), pool.X.std()], [0.0, 1.0], atol=1e-5)
