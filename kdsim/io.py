"""Saving and loading results: JSON + npz, never pickle, schema-versioned.

A result folder holds ``result.npz`` (every array) and ``result.json`` (config,
notes, metadata, column order and the npz's sha256). Both are written atomically
(temporary file, fsync, rename) and the JSON last, so a folder either holds a
complete result or none: a truncated or altered npz fails its checksum on load.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import math
import os
import tempfile
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd

from .config import SimConfig

SCHEMA = "kdsim.result/1"
JSON_NAME, NPZ_NAME = "result.json", "result.npz"


class ResultFileError(RuntimeError):
    """A result file is missing, corrupted, or of another schema."""


def kdsim_version() -> str:
    try:
        return metadata.version("kdsim")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def _jsonable(x: Any) -> Any:
    """JSON-safe copy; non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isfinite(x):
            return x
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def save_result(result, path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    dtypes = {}
    for col in result.per_dataset.columns:
        series = result.per_dataset[col]
        dtypes[col] = str(series.dtype)
        if dtypes[col] == "boolean":   # nullable flags travel as 1.0 / 0.0 / NaN
            arrays[f"per_dataset/{col}"] = series.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            arrays[f"per_dataset/{col}"] = series.to_numpy()
    arrays["summary"] = result.summary.to_numpy(dtype=np.float64)
    # text columns of the pooled rows (family, loss) travel in the JSON header
    text_cols = [c for c in result.pooled.columns
                 if not pd.api.types.is_numeric_dtype(result.pooled[c].dtype)]
    num_cols = [c for c in result.pooled.columns if c not in text_cols]
    arrays["pooled"] = result.pooled[num_cols].to_numpy(dtype=np.float64)
    for name, value in result.datasets.items():
        arrays[f"datasets/{name}"] = np.asarray(value)
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    blob = buf.getvalue()
    header = {
        "schema": SCHEMA,
        "kdsim_version": kdsim_version(),
        "config": result.config.to_dict(),
        "config_hash": result.config.hash(),
        "notes": list(result.notes),
        "meta": _jsonable(result.meta),
        "per_dataset_columns": list(result.per_dataset.columns),
        "per_dataset_dtypes": dtypes,
        "pooled_index": list(result.pooled.index),
        "pooled_columns": num_cols,
        "pooled_text": {c: [None if pd.isna(v) else str(v) for v in result.pooled[c]] for c in text_cols},
        "pooled_order": list(result.pooled.columns),
        "pooled_attrs": _jsonable(dict(result.pooled.attrs)),
        "summary_index": list(result.summary.index),
        "summary_columns": list(result.summary.columns),
        "dataset_keys": list(result.datasets),
        "npz_sha256": hashlib.sha256(blob).hexdigest(),
    }
    atomic_write_bytes(os.path.join(path, NPZ_NAME), blob)
    atomic_write_bytes(os.path.join(path, JSON_NAME),
                       json.dumps(_jsonable(header), indent=1, allow_nan=False).encode())
    return path


def read_json(path: str, error: type[Exception], missing: str) -> Any:
    """A JSON file's content; ``error(missing)`` if absent, ``error`` naming the file if it
    is not valid UTF-8 JSON (truncated, edited, binary)."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode())
    except FileNotFoundError:
        raise error(missing) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise error(f"{path} is corrupted ({err})") from None


def read_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields of a Result saved in a folder (``kdsim.load_result`` builds the Result);
    verify schema, checksum and config hash."""
    path = os.fspath(path)
    jpath, npath = os.path.join(path, JSON_NAME), os.path.join(path, NPZ_NAME)
    header = read_json(jpath, ResultFileError, f"no result in {path!r}: {JSON_NAME} is missing")
    schema = header.get("schema") if isinstance(header, dict) else None
    if schema != SCHEMA:
        raise ResultFileError(f"{jpath} has schema {schema!r}; this kdsim reads {SCHEMA!r}")
    try:
        with open(npath, "rb") as fh:
            blob = fh.read()
    except FileNotFoundError:
        raise ResultFileError(f"{npath} is missing") from None
    if hashlib.sha256(blob).hexdigest() != header["npz_sha256"]:
        raise ResultFileError(f"{npath} does not match its checksum (truncated or altered)")
    config = SimConfig.from_dict(header["config"])
    if config.hash() != header["config_hash"]:
        raise ResultFileError(f"{jpath}: the config does not match its hash")
    with np.load(_io.BytesIO(blob), allow_pickle=False) as z:
        per_dataset = pd.DataFrame({c: z[f"per_dataset/{c}"] for c in header["per_dataset_columns"]})
        for col, dtype in header["per_dataset_dtypes"].items():
            if dtype == "boolean":
                per_dataset[col] = _flags(per_dataset[col].to_numpy())
        pooled = pd.DataFrame(z["pooled"], index=pd.Index(header["pooled_index"], name="bound"),
                              columns=header["pooled_columns"])
        for col, values in header.get("pooled_text", {}).items():
            pooled[col] = pd.Series([np.nan if v is None else v for v in values], index=pooled.index)
        pooled = pooled[header.get("pooled_order", list(pooled.columns))]
        pooled.attrs.update(header["pooled_attrs"])
        summary = pd.DataFrame(z["summary"], index=pd.Index(header["summary_index"], name="quantity"),
                               columns=header["summary_columns"])
        datasets = {name: z[f"datasets/{name}"] for name in header["dataset_keys"]}
    if "n_datasets" in summary:
        summary["n_datasets"] = summary["n_datasets"].astype(np.int64)
    return dict(config=config, per_dataset=per_dataset, summary=summary, datasets=datasets,
                notes=list(header["notes"]), meta=header["meta"], pooled=pooled)


def _flags(values: np.ndarray) -> pd.arrays.BooleanArray:
    return pd.array([pd.NA if np.isnan(v) else bool(v) for v in values], dtype="boolean")
