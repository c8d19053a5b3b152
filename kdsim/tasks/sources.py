"""Where a pool's points come from (SPEC §9 "Data"): built-in real data sets, user arrays.

Built-in pools need no download: ``digits`` is the 1,797 8x8 handwritten digits shipped
inside scikit-learn (inputs ``(N, 8, 8, 1)``, 10 classes) and ``mnist1d`` is MNIST-1D
generated locally by the ``mnist1d`` package with its default arguments (5,000
sequences of length 40, 10 classes; its train and test splits together). Both need the
``data`` extra (``pip install "kdsim[data]"``).

Built-in features are standardised with the pool's own statistics: one mean and one
standard deviation over every entry of the (class-selected) pool, so images and
sequences keep their spatial structure and a pixel that is constant over the pool
stays harmless. User arrays are used as given (no standardisation).

Every pool is checked before anything runs (:func:`validate`): finite values, at least
2 points, ``X`` and ``Y`` of the same length, integer labels in ``[0, K)`` for
classification (``K`` = the largest label + 1, or ``len(classes)`` after a selection),
float targets ``(N, k)`` or ``(N,)`` for regression.
"""

from __future__ import annotations

import functools
import hashlib
import random
from typing import Any, NamedTuple

import numpy as np

from ..config import ConfigError

EXTRA_HINT = 'pip install "kdsim[data]"'


class DataError(ConfigError):
    """A pool is unusable (bad values or shapes, a missing optional extra); the message
    names the problem."""


class Pool(NamedTuple):
    """A finite pool of N labelled points: the data distribution is uniform on it."""

    X: np.ndarray          # (N, *input_shape) float32
    Y: np.ndarray          # (N,) int32 labels in [0, K), or (N, k) float32 targets
    classification: bool
    num_classes: int       # K (classification), else 0
    source: str            # "digits" | "mnist1d" | "arrays"
    digest: str            # sha256 of the pool's bytes, shapes and dtypes (point identity)

    @property
    def size(self) -> int:
        return int(self.X.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.X.shape[1:])

    @property
    def out(self) -> int:
        """Model output width: K logits or k regression outputs."""
        return self.num_classes if self.classification else int(self.Y.shape[1])


def _missing(package: str, source: str) -> DataError:
    return DataError(f"task.source = {source!r} needs the optional package {package!r} of "
                     f"kdsim's 'data' extra: {EXTRA_HINT}")


@functools.lru_cache(maxsize=None)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("scikit-learn", "digits") from None
    bunch = load_digits()   # shipped inside scikit-learn: no download
    X = np.asarray(bunch.data, np.float64).reshape(-1, 8, 8, 1)
    Y = np.asarray(bunch.target, np.int64)
    X.setflags(write=False)
    Y.setflags(write=False)
    return X, Y


@functools.lru_cache(maxsize=None)
def _mnist1d_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise _missing("mnist1d", "mnist1d") from None
    # make_dataset seeds NumPy's and Python's global generators (its default seed 42):
    # the caller's global random state is restored afterwards, whatever happens.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    X = np.concatenate([ds["x"], ds["x_test"]]).astype(np.float64)
    Y = np.concatenate([ds["y"], ds["y_test"]]).astype(np.int64)
    X.setflags(write=False)
    Y.setflags(write=False)
    return X, Y


def builtin(source: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw inputs and labels of a built-in pool (cached per process; read-only arrays)."""
    if source == "digits":
        return _digits_raw()
    if source == "mnist1d":
        return _mnist1d_raw()
    raise DataError(f"task.source must be 'digits', 'mnist1d' or 'arrays', got {source!r}")


def standardise(X: np.ndarray) -> np.ndarray:
    """``(X - mean) / std`` with the mean and std over every entry of the pool."""
    X = np.asarray(X, np.float64)
    sd = X.std()
    return (X - X.mean()) / (sd if sd > 0 else 1.0)


def select_classes(X: np.ndarray, Y: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """Keep the points whose label is in ``classes``, relabelled ``classes[j] -> j``."""
    if classes is None:
        return X, Y
    classes = [int(c) for c in classes]
    present = set(np.unique(Y).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise DataError(f"task.classes {list(classes)}: the pool has no points with label(s) "
                        f"{missing} (labels present: {sorted(present)})")
    keep = np.isin(Y, classes)
    relabel = {c: j for j, c in enumerate(classes)}
    return X[keep], np.array([relabel[int(y)] for y in Y[keep]], np.int64)


def _as_numpy(a: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(a)
    except Exception as err:   # noqa: BLE001 - any array-like that NumPy cannot read
        raise DataError(f"data: {name} is not an array ({type(a).__name__}): {err}") from None


def validate(X: Any, Y: Any, *, classification: bool, source: str = "arrays",
             classes=None) -> Pool:
    """Check a pool and bring it to kdsim's dtypes; apply the ``classes`` selection.

    Args:
      X: ``(N, *input_shape)`` numbers; Y: ``(N,)`` integer labels (classification), or
        ``(N, k)`` / ``(N,)`` float targets (regression).
    Raises:
      DataError naming the problem.
    """
    X, Y = _as_numpy(X, "X"), _as_numpy(Y, "Y")
    if X.ndim < 2:
        raise DataError(f"data: X must have shape (N, *input_shape) with at least 2 axes, got "
                        f"shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.number) and not np.issubdtype(X.dtype, np.complexfloating)):
        raise DataError(f"data: X must hold real numbers, got dtype {X.dtype}")
    if Y.ndim == 0 or len(Y) != len(X):
        raise DataError(f"data: X and Y must have the same length (one label per point), got "
                        f"{len(X)} inputs and {'a scalar' if Y.ndim == 0 else len(Y)} labels")
    if len(X) < 2:
        raise DataError(f"data: a pool needs at least 2 points, got {len(X)}")
    if not np.all(np.isfinite(X)):
        raise DataError(f"data: X holds {int(np.sum(~np.isfinite(X)))} NaN or infinite values")
    if classification:
        if Y.ndim != 1:
            raise DataError(f"data: classification labels Y must have shape (N,), got {Y.shape}")
        if np.issubdtype(Y.dtype, np.floating):
            if not np.all(np.isfinite(Y)):
                raise DataError("data: labels Y hold NaN or infinite values")
            raise DataError("data: classification labels Y must be integers (task.kind = "
                            f"'classification'), got dtype {Y.dtype}; use task.kind = "
                            "'regression' for float targets")
        if not np.issubdtype(Y.dtype, np.integer) or np.issubdtype(Y.dtype, np.bool_):
            raise DataError(f"data: classification labels Y must be integers, got dtype {Y.dtype}")
        if Y.min() < 0:
            raise DataError(f"data: labels Y must be in [0, K), got the label {int(Y.min())}")
        X, Y = select_classes(X, Y, classes)
        K = int(Y.max()) + 1 if len(Y) else 0
        if classes is None and K > 4096:
            raise DataError(f"data: labels Y must be in [0, K) with K <= 4096 classes, got the "
                            f"label {K - 1}")
        if len(np.unique(Y)) < 2:
            raise DataError(f"data: a classification pool needs at least 2 classes, got labels "
                            f"{np.unique(Y).tolist()}")
        Y = Y.astype(np.int32)
    else:
        if not (np.issubdtype(Y.dtype, np.number) and not np.issubdtype(Y.dtype, np.complexfloating)):
            raise DataError(f"data: regression targets Y must be real numbers, got dtype {Y.dtype}")
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2:
            raise DataError(f"data: regression targets Y must have shape (N, k) or (N,), got "
                            f"{Y.shape}")
        if not np.all(np.isfinite(Y)):
            raise DataError(f"data: Y holds {int(np.sum(~np.isfinite(Y)))} NaN or infinite values")
        Y = Y.astype(np.float32)
        K = 0
    if len(X) < 2:      # after a class selection
        raise DataError(f"data: a pool needs at least 2 points, got {len(X)} (task.classes "
                        f"{list(classes) if classes is not None else None})")
    X = np.ascontiguousarray(X, np.float32)
    Y = np.ascontiguousarray(Y)
    return Pool(X, Y, classification, K, source, digest(X, Y))


def digest(X: np.ndarray, Y: np.ndarray) -> str:
    """sha256 of a pool's shapes, dtypes and bytes: two pools share it only if equal."""
    h = hashlib.sha256()
    for a in (X, Y):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load(task, data: Any = None) -> Pool:
    """The pool of a ``pool`` task config: built-in (``digits``, ``mnist1d``), the ``data``
    pair, or the ``.npz`` file ``task.path`` (``source = "arrays"``)."""
    if task.source != "arrays":
        if data is not None:
            raise DataError(f"data=(X, Y) was given but task.source = {task.source!r}; set "
                            "task.source = 'arrays' to use your own pool")
        X, Y = builtin(task.source)
        Xs, Ys = select_classes(X, Y, task.classes)
        return validate(standardise(Xs), Ys, classification=True, source=task.source)
    if data is None:
        if task.path is None:
            raise DataError("task.source = 'arrays' needs the pool: simulate(cfg, data=(X, Y)) "
                            "or task.path = an .npz file with arrays X and Y")
        data = read_npz(task.path)
    elif task.path is not None:
        raise DataError("give the pool either as data=(X, Y) or as task.path, not both")
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError(f"data must be a pair (X, Y) of arrays, got {type(data).__name__}")
    return validate(data[0], data[1], classification=task.kind == "classification",
                    source="arrays", classes=task.classes)


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``X`` and ``Y`` of an ``.npz`` file (never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("X", "Y") if k not in z.files]
            if missing:
                raise DataError(f"task.path {path!r} has no array(s) {missing} (it holds "
                                f"{sorted(z.files)}); save the pool with np.savez(path, X=X, Y=Y)")
            return z["X"], z["Y"]
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"task.path {path!r}: cannot read an .npz file ({err})") from None
