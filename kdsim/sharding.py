"""Spreading a population over the local devices and over JAX processes.

The engine's arrays have leading axes ``(E, P)`` (datasets, particles) and every chain
is independent, so the population splits over devices without communication: the
dataset axis when ``E`` divides evenly, else the particle axis. Per-dataset data follow
the population (split with it over datasets, replicated over particles). ``jax.jit``
propagates the layout through every compiled segment.

Each particle's random draws never change with the layout (they are keyed by global
dataset and particle index, :mod:`kdsim.streams`). Its arithmetic may: XLA picks matmul
and reduction kernels by batch shape, so a population split over devices, chunks or
processes agrees with the single-device run to float32 rounding (growing slowly along
the run), and float64 estimates to about 1e-10 relative. The same layout is
bit-identical rerun after rerun. Speed and generality (library matmuls, autodiff, any
architecture) come first.

**Multi-host JAX.** After ``jax.distributed.initialize(...)`` on every process (on CPUs
also ``jax.config.update("jax_cpu_collectives_implementation", "gloo")``), each process
trains an equal share of the datasets (or, when they do not divide, of the particles):
:func:`process_share`; :func:`gather` joins the shares on every process, so estimation
then runs identically everywhere.

On a CPU, JAX shows one device unless asked for more before it starts; kdsim's CLI and
benchmarks ask for one per core (:func:`cpu_device_flags`), notebooks can set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before importing jax.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from .config import ConfigError

_FLAG = "--xla_force_host_platform_device_count"


def cpu_device_flags(env: dict | None = None) -> None:
    """Ask XLA for one CPU device per core (call before jax starts; no-op if already set).

    Only the host platform is affected; on a GPU machine the GPU stays the default.
    """
    env = os.environ if env is None else env
    flags = env.get("XLA_FLAGS", "")
    if _FLAG not in flags:
        env["XLA_FLAGS"] = f"{flags} {_FLAG}={os.cpu_count() or 1}".strip()


class Layout(NamedTuple):
    """How one population of ``(E, P)`` chains is laid out over the local devices."""

    mesh: Mesh | None
    axis: int | None        # 0: datasets split, 1: particles split, None: one device

    def particles(self, tree: Any) -> Any:
        """Place arrays with leading axes ``(E, P)``."""
        if self.mesh is None:
            return tree
        spec = PS("pop") if self.axis == 0 else PS(None, "pop")
        return jax.device_put(tree, NamedSharding(self.mesh, spec))

    def datasets(self, tree: Any) -> Any:
        """Place per-dataset arrays (leading axis ``E``): split with the population, or
        replicated when the particles are split."""
        if self.mesh is None:
            return tree
        spec = PS("pop") if self.axis == 0 else PS()
        return jax.device_put(tree, NamedSharding(self.mesh, spec))


def split_axis(num_datasets: int, num_particles: int, parts: int) -> int | None:
    """The axis an ``(E, P)`` population splits along into ``parts`` equal shares
    (devices or processes): datasets (0) when they divide evenly, else particles (1),
    else None."""
    if num_datasets % parts == 0:
        return 0
    if num_particles % parts == 0:
        return 1
    return None


def layout(num_datasets: int, num_particles: int, devices=None) -> Layout:
    """The layout of an ``(E, P)`` population over ``devices`` (default: local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    axis = split_axis(num_datasets, num_particles, len(devices)) if len(devices) > 1 else None
    if axis is None:
        return Layout(None, None)
    return Layout(Mesh(devices, ("pop",)), axis)


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
    axis = split_axis(num_datasets, num_particles, count)
    if axis == 0:
        return Share(np.array_split(ds, count)[index], ps, 0, count)
    if axis == 1:
        return Share(ds, np.array_split(ps, count)[index], 1, count)
    raise ConfigError(
        f"{count} JAX processes need num_datasets ({num_datasets}) or num_particles "
        f"({num_particles}) to be a multiple of {count}")


def gather(x, share: Share):
    """Every process's share of one array, joined along the split axis, on every process."""
    if share.axis is None or x is None:
        return x
    from jax.experimental import multihost_utils

    x = np.asarray(x)
    with jax.enable_x64(True):          # float64 populations must stay float64
        full = np.asarray(multihost_utils.process_allgather(x, tiled=False))
    if full.dtype != x.dtype:
        raise RuntimeError(f"gathering changed {x.dtype} to {full.dtype}")
    return np.concatenate(list(full), axis=share.axis)    # (processes, ...) -> joined
