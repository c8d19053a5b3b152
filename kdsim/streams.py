"""Random streams derived by name and global index.

Every random draw in kdsim comes from a key derived from the root key of the run
(``jax.random.key(seed)``) by folding in, in order, the stream's number, the global
dataset index and the global particle index::

    particle_key = fold_in(fold_in(fold_in(root, STREAM[name]), dataset), particle)
    step_key     = fold_in(particle_key, t)          # noise of Langevin step t

so a particle's draws depend only on (seed, stream, dataset, particle, step): never on
how many particles or datasets run, in which chunk, on which device. Streams are fixed
integers (never reorder or reuse them: results would silently change), one per
consumer, so no key is ever used twice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Stream numbers are part of the reproducibility contract: append, never renumber.
STREAMS: dict[str, int] = {
    "task": 1,            # planted parameters (W*, planted network): fixed per seed
    "data_x": 2,          # training inputs, per dataset
    "data_y": 3,          # training label noise, per dataset
    "teacher_init": 4,    # per (dataset, particle)
    "teacher_noise": 5,   # per (dataset, particle), then per step
    "student_init": 6,
    "student_noise": 7,
    "soft_label": 8,      # teacher channel noise nu_T e_i, drawn once per student particle
    "test": 9,            # fresh test points for tasks without a closed-form risk
    "ghost": 10,          # ghost points of the function-space bounds
    "channel": 11,        # prediction-channel noise draws of the function-space CGF
    "estimators": 12,     # Hutchinson probes, power-iteration starts, bootstrap
    "test_y": 13,         # labels of the fresh test points
    "pool_index": 14,     # pool tasks: which pool points a dataset draws, per dataset
    "trajectory_T": 15,   # examples J sampled per step for the teacher's trajectory sums
    "trajectory_S": 16,   # the same for the student phase
    "clip_test": 17,      # fresh test points for the clipped-loss truth of the linear task
    "soft_label_rest": 18,  # linear task: the per-example channel noise beyond its statistic
    "mask": 19,           # supersample runs: the mask U of dataset e = (supersample, mask)
    "cmi_rounding": 20,   # CMI bounds: stochastic rounding of clipped losses onto a grid
}


def root_key(seed: int) -> jax.Array:
    """The run's root key (typed threefry key)."""
    return jax.random.key(seed)


def stream_key(root: jax.Array, name: str) -> jax.Array:
    return jax.random.fold_in(root, STREAMS[name])


def dataset_key(root: jax.Array, name: str, dataset: jax.Array | int) -> jax.Array:
    """Key of one dataset in a stream; ``dataset`` may be a traced global index."""
    return jax.random.fold_in(stream_key(root, name), dataset)


def particle_key(root: jax.Array, name: str, dataset: jax.Array | int,
                 particle: jax.Array | int) -> jax.Array:
    """Key of one particle of one dataset in a stream (global indices)."""
    return jax.random.fold_in(dataset_key(root, name, dataset), particle)


def particle_keys(root: jax.Array, name: str, datasets: jax.Array,
                  particles: jax.Array) -> jax.Array:
    """Keys for a grid of global indices.

    Args:
      datasets: ``(E,)`` global dataset indices.
      particles: ``(P,)`` global particle indices.
    Returns:
      ``(E, P)`` keys.
    """
    per_dataset = jax.vmap(lambda e: dataset_key(root, name, e))(datasets)
    return jax.vmap(lambda kd: jax.vmap(lambda i: jax.random.fold_in(kd, i))(particles))(
        per_dataset)


def step_key(key: jax.Array, t: jax.Array | int) -> jax.Array:
    """Key of Langevin step ``t`` (global step index) of a particle."""
    return jax.random.fold_in(key, t)


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Standard normal draws of ``shape``, generated flat and reshaped.

    Same law as ``jax.random.normal(key, shape)``; generating a 1-d array compiles
    several times faster on XLA:CPU than a multi-dimensional one.
    """
    size = 1
    for s in shape:
        size *= int(s)
    return jax.random.normal(key, (size,), dtype).reshape(shape)


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Random signs of ``shape`` (flat generation, as :func:`normal`)."""
    size = 1
    for s in shape:
        size *= int(s)
    return jax.random.rademacher(key, (size,), dtype).reshape(shape)
