"""Spreading a population over the local devices (data parallelism over datasets).

The engine's arrays have leading axes ``(E, P)`` (datasets, particles) and every chain
is independent, so the population splits over devices without communication: the
dataset axis when ``E`` divides evenly, else the particle axis. Per-dataset data follow
the population (split with it over datasets, replicated over particles). ``jax.jit``
propagates the layout through every compiled segment. Each particle's draws never
change, and every sum in the engine's arithmetic is a per-chain chain in a fixed order
(:mod:`kdsim.ordered`), so states split over datasets or over particles are
bit-identical to a single-device run, for the MLP tasks and the linear task up to
d = 64 (:func:`kdsim.tasks.linear_gaussian.chain_matmul`). A device never
holds a single chain (XLA compiles a batch of one without its batch axis, and the
arithmetic can then differ): such populations stay on one device.

On a CPU, JAX shows one device unless asked for more before it starts; kdsim's CLI and
benchmarks ask for one per core (:func:`cpu_device_flags`), notebooks can set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before importing jax.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

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

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.devices.size


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
    if axis == 1 and num_datasets * num_particles < 2 * len(devices):
        axis = None         # one chain a device: see kdsim.ordered (batches of >= 2 chains)
    if axis is None:
        return Layout(None, None)
    return Layout(Mesh(devices, ("pop",)), axis)
