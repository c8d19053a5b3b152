"""Beyond one process: one population across JAX processes, sweep points as Ray tasks.

**Multi-host JAX.** After ``jax.distributed.initialize(...)`` on every process (on CPUs
also ``jax.config.update("jax_cpu_collectives_implementation", "gloo")``), ``simulate``
gives each process an equal share of the datasets (or, when they do not divide, of the
particles), trains it on that process's devices, and gathers the shares on every
process; estimation then runs identically everywhere. Draws are keyed by global
indices and the engine's arithmetic is per chain in a fixed order (:mod:`kdsim.ordered`),
so either split reproduces the single-process run's states bit for bit.

**Ray.** Sweep points as tasks of an existing distributed engine, no home-made scheduler.

Each point is one Ray task that runs :func:`kdsim.sweep.run_point` and writes its result
into the sweep's store, atomically, exactly as a serial sweep would; the driver then
reads the store back. A point's numbers depend only on its config, so the table equals
the serial sweep's, whatever ran where. Across machines the store folder must be on a
filesystem every worker sees (NFS, a mounted bucket).

    import kdsim
    from kdsim.distributed import ray_executor
    kdsim.sweep(base, grid, out="runs/big", executor=ray_executor(num_gpus=1))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from . import populations, sharding
from .config import ConfigError, SimConfig


class Share(NamedTuple):
    """The part of an ``(E, P)`` population this process trains."""

    datasets: np.ndarray    # global dataset indices
    particles: np.ndarray   # global particle indices
    axis: int | None        # 0: datasets split over processes, 1: particles, None: one process
    processes: int


def process_share(num_datasets: int, num_particles: int, index: int | None = None,
                  count: int | None = None) -> Share:
    """This process's datasets and particles (contiguous blocks of global indices)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    ds, ps = np.arange(num_datasets), np.arange(num_particles)
    if count == 1:
        return Share(ds, ps, None, 1)
    axis = sharding.split_axis(num_datasets, num_particles, count)
    if axis == 0:
        return Share(np.array_split(ds, count)[index], ps, 0, count)
    if axis == 1:
        return Share(ds, np.array_split(ps, count)[index], 1, count)
    raise ConfigError(
        f"{count} JAX processes need num_datasets ({num_datasets}) or num_particles "
        f"({num_particles}) to be a multiple of {count}")


def gather_populations(local, share: Share):
    """Every process's share, joined along the split axis, on every process."""
    if share.axis is None:
        return local
    from jax.experimental import multihost_utils

    def gather(x):
        if x is None:
            return None
        x = np.asarray(x)
        with jax.enable_x64(True):          # float64 populations must stay float64
            full = np.asarray(multihost_utils.process_allgather(x, tiled=False))
        if full.dtype != x.dtype:
            raise RuntimeError(f"gathering changed {x.dtype} to {full.dtype}")
        return np.concatenate(list(full), axis=share.axis)    # (processes, ...) -> joined

    return type(local)(**populations.map_arrays(gather, local), seconds=dict(local.seconds))


def _run_point_task(out: str, index: int, values: Mapping[str, Any], config: Mapping[str, Any]) -> int:
    from .sweep import run_point
    run_point(out, index, values, SimConfig.from_dict(config))
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

    def execute(out: str, todo: Sequence) -> None:
        if not ray.is_initialized():
            ray.init(address=address, **dict(init_kwargs or {}))
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_run_point_task)
        # configs travel as plain data (dicts), never as pickled kdsim objects
        refs = [task.remote(out, i, dict(values), cfg.to_dict()) for i, values, cfg in todo]
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
