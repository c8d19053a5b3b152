"""Memory estimate of a run, and the guard that stops it before allocating.

Two budgets matter: the engine's device memory for one particle chunk (``num_datasets x
particle_chunk`` chains advanced together) and the host memory that holds every final
particle and the estimators' working copies. Both are estimated from the config alone,
conservatively (a few live copies of every per-particle array), and compared with what
the device and the host have free before anything is allocated.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import numpy as np

from .config import ConfigError, Resolved, SimConfig, resolve

GiB = float(1 << 30)
USABLE_FRACTION = 0.8     # of the free memory a run may plan to use


class MemoryBudgetError(ConfigError):
    """A run would not fit in memory; the message says how to chunk it."""


class Estimate(NamedTuple):
    engine_bytes: float       # device memory for one chunk of the population
    host_bytes: float         # host memory for the whole run's particles and estimators
    population_bytes: float   # host memory for the final particles alone (no estimation)
    chunk_particles: int      # chains advanced together (num_datasets x particle_chunk)
    bytes_per_chain: float    # engine bytes per chain (to size a chunk)


def parameter_count(res: Resolved) -> tuple[int, int]:
    """Parameters of one teacher and one student particle of the built-in models."""
    st = res.static
    if st.task == "linear_gaussian":
        return st.k * st.d, st.k * st.rank
    out = st.num_classes if st.classification else st.k

    def count(kind, width, depth, channels, kernel_size):
        if kind == "cnn":
            dims = [1] + [channels] * depth
            return sum(kernel_size * a * b + b for a, b in zip(dims[:-1], dims[1:])) + channels * out + out
        dims = [st.d] + [width] * depth + [out]
        return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))

    spec_T, spec_S = _specs(st)
    return count(*spec_T), count(*spec_S)


def _specs(st) -> tuple[tuple, tuple]:
    return ((st.teacher_kind, st.teacher_width, st.teacher_depth, st.teacher_channels,
             st.teacher_kernel_size),
            (st.student_kind, st.student_width, st.student_depth, st.student_channels,
             st.student_kernel_size))


def _activations(res: Resolved) -> int:
    """Hidden units per example of the widest built-in model (per-chain activations)."""
    st = res.static
    units = 0
    for kind, width, depth, channels, _ in _specs(st):
        units = max(units, channels * depth * st.d if kind == "cnn" else width * depth)
    return units


def estimate(config, params: tuple[int, int] | None = None) -> Estimate:
    """Conservative memory estimate (bytes) of a run: a SimConfig, a mapping or a Resolved.

    ``params``: the parameter counts of the teacher and student (user models); default:
    the built-in models of the config."""
    res = config if isinstance(config, Resolved) else resolve(
        config if isinstance(config, SimConfig) else SimConfig.from_dict(config))
    st = res.static
    item = np.dtype(st.dtype).itemsize
    p_T, p_S = parameter_count(res) if params is None else params
    p = max(p_T, p_S)
    if st.task == "linear_gaussian":
        # position, new position, noise, gradient, student target, Girsanov terms
        per_chain = 6 * p * item + 64
        # teacher (dtype), student V (dtype) + W_S and scratch (float64), the
        # estimators' float64 copies of W_T, W_S and their differences; the
        # function-space stage's predictions on the training and ghost points
        pop_per = p_T * item + p_S * item + 2 * 8 * p_T
        host_per = pop_per + 4 * 8 * p_T + 3 * (st.n + res.ghost_points) * st.k * 8
    else:
        out = st.num_classes if st.classification else st.k
        width = max(_activations(res), p // max(st.d, 1))   # user models: a guess from their size
        # parameters as above; per-example targets; activations of forward and backward
        per_chain = (6 * p + 2 * st.n * out + 3 * st.n * width) * item + 64
        # three populations of parameters, and predictions on the test and ghost points
        pop_per = (p_T + 2 * p_S) * item
        host_per = pop_per + 3 * (st.n_test + res.ghost_points) * out * 8
    if st.trajectory:
        # the trajectory sums' per-example gradients of m examples (kdsim.trajectory), their
        # deviations, and the student's soft labels of its partner (linear task)
        m = st.trajectory_examples or st.n
        per_chain += (2 * m * p + (st.n * st.k if st.task == "linear_gaussian" else 0)) * item
    chunk = st.num_datasets * st.particle_chunk
    # the itemised host count fell 1.7x short of the peak RSS measured on 2^20 linear
    # particles (temporaries of the estimators, the allocator): doubled
    return Estimate(engine_bytes=chunk * per_chain,
                    host_bytes=2.0 * st.num_datasets * st.num_particles * host_per,
                    population_bytes=2.0 * st.num_datasets * st.num_particles * pop_per,
                    chunk_particles=chunk, bytes_per_chain=per_chain)


def available() -> tuple[float, float]:
    """(free device memory, free host memory) in bytes; inf where unknown."""
    host = float("inf")
    try:
        host = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    dev = jax.local_devices()[0]
    device = host if dev.platform == "cpu" else float("inf")
    try:
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            device = float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    # several local devices share the population: each holds its share of a chunk
    return device * max(1, jax.local_device_count()), host


def check(res: Resolved, free: tuple[float, float] | None = None, evaluate: bool = True,
          params: tuple[int, int] | None = None) -> Estimate:
    """Raise :class:`MemoryBudgetError` (a ConfigError) if the run would not fit; else the
    estimate. ``evaluate=False``: the populations only (``run_populations``)."""
    st = res.static
    est = estimate(res, params)
    device, host = available() if free is None else free
    if est.engine_bytes > USABLE_FRACTION * device:
        fit = int(USABLE_FRACTION * device // (est.bytes_per_chain * st.num_datasets))
        hint = (f"set particle_chunk <= {fit}" if fit >= 1 else
                "run fewer datasets per simulation (a sweep over seeds)")
        raise MemoryBudgetError(
            f"the engine would need about {est.engine_bytes / GiB:.1f} GiB for "
            f"num_datasets x particle_chunk = {st.num_datasets} x {st.particle_chunk} chains, "
            f"more than {USABLE_FRACTION:.0%} of the {device / GiB:.1f} GiB free on "
            f"{jax.local_devices()[0].platform}: {hint}")
    need = est.host_bytes if evaluate else est.population_bytes
    if need > USABLE_FRACTION * host:
        raise MemoryBudgetError(
            f"the results of num_datasets x num_particles = {st.num_datasets} x "
            f"{st.num_particles} particles would need about {need / GiB:.1f} GiB of "
            f"host memory, more than {USABLE_FRACTION:.0%} of the {host / GiB:.1f} GiB free: "
            "use fewer particles, or spread the datasets over a sweep of seeds")
    return est
