"""Sweeps: many configs (regimes, seeds), resumable, with a durable on-disk store.

``kdsim.sweep(cfg, grid, out=DIR)`` runs the cartesian product of ``grid`` (dotted field
names to lists of values) over the base config and returns a tidy DataFrame: one row
per point and dataset, the swept fields as columns named by their dotted path, then
``point``, ``dataset`` and every ``per_dataset`` column.

The store (``DIR``):

- ``manifest.json`` -- base config, grid, and every point's values and config hash;
  written once, atomically, before the first point runs;
- ``points/<index>-<hash>/`` -- one finished point: ``result.json`` + ``result.npz``
  written atomically (temporary file, fsync, rename; the JSON last) the moment the point
  finishes (:meth:`kdsim.Result.save`).

A point is finished iff its folder loads (schema, checksum and config hash verified),
so a sweep killed at any moment loses at most the point in flight, and rerunning it
recomputes nothing that finished; a truncated or corrupted point is recomputed, never
loaded. Points run one at a time, so memory is that of one point; points that share
shapes reuse the compiled programs (numeric fields are traced). Independent point
folders are also what lets several workers (Ray tasks) fill one store concurrently.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

import hashlib

from . import io
from .models.protocol import fingerprint
from .config import ConfigError, SimConfig, field_paths, read_toml
from .progress import Progress
from .progress import enabled as progress_enabled
from .result import Result, load_result
from .simulate import DivergenceError, _as_config, simulate
from .tasks.sources import digest

SCHEMA = "kdsim.sweep/1"
MANIFEST = "manifest.json"


class SweepError(RuntimeError):
    """A sweep folder does not match the sweep asked for, or cannot be read."""


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid`` as a list of ``{dotted field: value}``, in order
    (the last field varies fastest)."""
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("grid must be a non-empty table of field -> list of values")
    known = set(field_paths())
    for key, values in grid.items():
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"grid: unknown field {key!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ConfigError(f"grid: {key!r} must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_configs(config: SimConfig, grid: Mapping[str, Sequence[Any]]) -> list[tuple[dict, SimConfig]]:
    """Every point's values and validated config (all checked before anything runs)."""
    out = []
    for values in expand_grid(grid):
        try:
            out.append((values, config.replace(values)))
        except ConfigError as err:
            raise ConfigError(f"grid point {values}: {err}") from None
    return out


def point_hash(cfg: SimConfig, inputs: Mapping[str, Any] | None = None) -> str:
    """A point's identity: its config, and the user models and pool it runs (if any), so
    a resumed sweep never mixes results of other models or other pools."""
    if not inputs:
        return cfg.hash()
    text = cfg.hash() + "".join(f"|{k}={_identity(k, v)}" for k, v in sorted(inputs.items())
                                if v is not None)
    return hashlib.sha256(text.encode()).hexdigest()


def _identity(name: str, value: Any) -> str:
    """What identifies a sweep input: a user model's fingerprint, a pool's content hash."""
    if name == "data":
        return "pool:" + pool_digest(value)
    return fingerprint(value)


def pool_digest(data: Any) -> str:
    """sha256 of a user pool ``(X, Y)`` as given (shapes, dtypes and bytes)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ConfigError(f"data must be a pair (X, Y) of arrays, got {type(data).__name__}")
    return digest(np.asarray(data[0]), np.asarray(data[1]))


def _point_dir(root: str, index: int, hash_: str) -> str:
    return os.path.join(root, "points", f"{index:05d}-{hash_[:12]}")


def _write_manifest(out: str, config: SimConfig, grid: Mapping[str, Sequence[Any]],
                    points: list[tuple[dict, SimConfig]], inputs: Mapping[str, Any]) -> None:
    manifest = {
        "schema": SCHEMA, "kdsim_version": io.kdsim_version(), "base": config.to_dict(),
        "grid": {k: list(v) for k, v in grid.items()},
        "models": {k: _identity(k, v) for k, v in sorted(inputs.items())},
        "points": [{"index": i, "values": values, "hash": point_hash(cfg, inputs)}
                   for i, (values, cfg) in enumerate(points)],
    }
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        old = read_manifest(out)
        if old["base"] != manifest["base"] or old["grid"] != manifest["grid"] \
                or old.get("models", {}) != manifest["models"]:
            raise SweepError(f"{out} holds a different sweep (base config, grid, pool or "
                             "models differ); choose another --out folder")
        return
    os.makedirs(os.path.join(out, "points"), exist_ok=True)
    io.atomic_write_bytes(path, json.dumps(io._jsonable(manifest), indent=1).encode())


def read_manifest(out: str | os.PathLike[str]) -> dict:
    path = os.path.join(os.fspath(out), MANIFEST)
    manifest = io.read_json(path, SweepError, f"no sweep in {os.fspath(out)!r}: {MANIFEST} is missing")
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise SweepError(f"{path} has schema {manifest.get('schema') if isinstance(manifest, dict) else None!r}; "
                         f"this kdsim reads {SCHEMA!r}")
    return manifest


def load_point(folder: str, expected_hash: str) -> Result | None:
    """A finished point, or None if it is missing, incomplete, corrupted or foreign."""
    if not os.path.exists(os.path.join(folder, io.JSON_NAME)):
        return None
    try:
        res = load_result(folder)
    except (io.ResultFileError, ConfigError, KeyError, ValueError, OSError):
        return None
    stored = res.meta.get("sweep_point", {}).get("hash", res.config.hash())
    return res if stored == expected_hash else None


def point_table(values: Mapping[str, Any], index: int, res: Result) -> pd.DataFrame:
    """One point's rows of the tidy table: swept fields, ``point``, then ``per_dataset``."""
    df = res.per_dataset.copy()
    front = {key: [value] * len(df) for key, value in values.items()}
    front["point"] = [index] * len(df)
    return pd.concat([pd.DataFrame(front, index=df.index), df], axis=1)


def run_point(out: str | None, index: int, values: Mapping[str, Any], cfg: SimConfig,
              **inputs: Any) -> Result:
    """Run one point and, with a store, save it atomically (used by workers too).

    ``inputs``: ``teacher_model`` / ``student_model`` / ``data`` passed on to
    :func:`kdsim.simulate`."""
    try:
        res = simulate(cfg, progress=False, **inputs)
    except DivergenceError as err:     # finished points stay in the store
        raise DivergenceError(f"sweep point {index} {dict(values)}: {err}", err.run) from None
    except ConfigError as err:         # e.g. a step size beyond the data's stability limit
        raise type(err)(f"sweep point {index} {dict(values)}: {err}") from None
    res.meta["sweep_point"] = {"index": index, "values": dict(values),
                               "hash": point_hash(cfg, inputs)}
    if out is not None:
        res.save(_point_dir(out, index, point_hash(cfg, inputs)))
    return res


def sweep(config: SimConfig | Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
          out: str | os.PathLike[str] | None = None, *, progress: bool | None = None,
          executor: Any = None, teacher_model: Any = None,
          student_model: Any = None, data: Any = None) -> pd.DataFrame:
    """Run every point of ``grid`` over ``config``; resume from ``out`` if it holds one.

    Args:
      config: the base config (a :class:`SimConfig` or a mapping).
      grid: dotted field names to lists of values, e.g. ``{"task.n": [16, 64, 256]}``.
      out: the store folder (None: in memory only, nothing is resumable).
      progress: a progress bar over points (default: on a terminal, off under ``CI``).
      executor: optional ``executor(out, todo, inputs) -> None`` that computes the listed
        ``(index, values, config)`` points into the store elsewhere (e.g.
        :func:`ray_executor`); default: here, one after the other.
      teacher_model, student_model: user models passed to every point's
        :func:`kdsim.simulate` (they are part of each point's identity in the store).
      data: the pool ``(X, Y)`` of a ``pool`` task with ``task.source = "arrays"``, passed
        to every point; its content hash is part of each point's identity, so a store
        resumed with another pool never mixes the two.
    Returns:
      the tidy table (one row per point and dataset).
    """
    inputs = {k: v for k, v in (("teacher_model", teacher_model),
                                ("student_model", student_model), ("data", data)) if v is not None}
    base = _as_config(config)
    points = point_configs(base, grid)
    out = None if out is None else os.fspath(out)
    results: dict[int, Result] = {}
    todo = []
    if out is not None:
        _write_manifest(out, base, grid, points, inputs)
        for i, (values, cfg) in enumerate(points):
            h = point_hash(cfg, inputs)
            res = load_point(_point_dir(out, i, h), h)
            if res is not None:
                results[i] = res
            else:
                todo.append((i, values, cfg))
    else:
        todo = [(i, values, cfg) for i, (values, cfg) in enumerate(points)]
    if executor is not None and todo:
        if out is None:
            raise ConfigError("an executor needs a store: pass out=DIR")
        executor(out, todo, inputs)
        for i, values, cfg in todo:
            h = point_hash(cfg, inputs)
            res = load_point(_point_dir(out, i, h), h)
            if res is None:
                raise SweepError(f"point {i} {values} did not finish in {out}")
            results[i] = res
    else:
        with Progress(len(points), "kdsim sweep", unit="point",
                      enabled=progress_enabled(progress)) as bar:
            bar.update(len(points) - len(todo))
            for i, values, cfg in todo:
                results[i] = run_point(out, i, values, cfg, **inputs)
                bar.update(1, ", ".join(f"{k}={v}" for k, v in values.items()))
    return pd.concat([point_table(points[i][0], i, results[i]) for i in sorted(results)],
                     ignore_index=True)


def load_sweep(out: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a sweep folder back: the tidy table of its finished points.

    ``df.attrs["missing"]`` lists the indices of points not finished (yet).
    """
    out = os.fspath(out)
    manifest = read_manifest(out)
    frames, missing = [], []
    for entry in manifest["points"]:
        res = load_point(_point_dir(out, entry["index"], entry["hash"]), entry["hash"])
        if res is None:
            missing.append(entry["index"])
            continue
        frames.append(point_table(entry["values"], entry["index"], res))
    if not frames:
        raise SweepError(f"no finished point in {out}")
    table = pd.concat(frames, ignore_index=True)
    table.attrs["missing"] = missing
    table.attrs["grid"] = manifest["grid"]
    return table


def load_sweep_file(path: str | os.PathLike[str]) -> tuple[SimConfig, dict[str, list]]:
    """A sweep TOML file: a ``[base]`` table (a config) and a ``[grid]`` table."""
    data = read_toml(path)
    unknown = set(data) - {"base", "grid"}
    if unknown:
        raise ConfigError(f"sweep file {os.fspath(path)!r}: unknown table(s) {sorted(unknown)}; "
                          "expected [base] and [grid]")
    if "grid" not in data:
        raise ConfigError(f"sweep file {os.fspath(path)!r} has no [grid] table")
    base = SimConfig.from_dict(data.get("base", {}))
    grid = _flatten(data["grid"])
    return base, grid


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, list]:
    """``{"task": {"n": [..]}}`` and ``{"task.n": [..]}`` both give ``{"task.n": [..]}``."""
    out = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ---------------------------------------------------------------------------------------
# Ray: sweep points as tasks of an existing distributed engine, no home-made scheduler.
#
# Each point is one Ray task that runs run_point and writes its result into the sweep's
# store, atomically, exactly as a serial sweep would; the driver then reads the store
# back. A point's numbers depend only on its config (and models), so the table equals
# the serial sweep's, whatever ran where. Across machines the store folder must be on a
# filesystem every worker sees (NFS, a mounted bucket).
#
#     kdsim.sweep(base, grid, out="runs/big", executor=kdsim.ray_executor(num_gpus=1))


def _run_point_task(out: str, index: int, values: Mapping[str, Any], config: Mapping[str, Any],
                    inputs: Mapping[str, Any]) -> int:
    run_point(out, index, values, SimConfig.from_dict(config), **inputs)
    return index


def ray_executor(num_cpus: float = 1, num_gpus: float = 0, address: str | None = None,
                 init_kwargs: Mapping[str, Any] | None = None) -> Callable[[str, Sequence], None]:
    """An executor for :func:`kdsim.sweep` that runs every point as a Ray task.

    Args:
      num_cpus, num_gpus: resources each point asks for (``num_gpus=1``: one GPU per point).
      address: the Ray cluster (``"auto"``, ``"ray://host:10001"``); None starts or joins
        a local one.
      init_kwargs: further ``ray.init`` arguments (used only if Ray is not running yet).
    Raises:
      ImportError: Ray is missing (``pip install "kdsim[ray]"``).
    """
    try:
        import ray
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('the Ray executor needs Ray: pip install "kdsim[ray]"') from err

    def execute(out: str, todo: Sequence, inputs: Mapping[str, Any] | None = None) -> None:
        if not ray.is_initialized():
            ray.init(address=address, **dict(init_kwargs or {}))
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_run_point_task)
        # configs travel as plain data (dicts); user models (if any) as Ray objects
        shared = ray.put(dict(inputs or {}))
        refs = [task.remote(out, i, dict(values), cfg.to_dict(), shared) for i, values, cfg in todo]
        ray.wait(refs, num_returns=len(refs))    # every point runs to its end first
        errors = []
        for ref in refs:
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others
                errors.append(err)
        if errors:      # finished points are in the store; a rerun resumes from them
            raise errors[0]

    return execute
