"""Two-phase training of teacher and student populations (SPEC §2).

E datasets x P particles advance together: the code below is written for ONE particle
of ONE dataset, vmapped over particles and then datasets, with ``lax.scan`` over steps.

Phase 1 runs the teachers. Phase 2 runs each student particle against its partner's
FINAL teacher state, frozen for the whole student run, with its own soft-label noise
drawn once. Teacher and student particle ``i`` of dataset ``e`` are a pair: this
pairing is the coupling of the two training processes.

Linear fast path: the student's distillation target only enters the gradient through
``T = alpha Cyx + (1 - alpha)(W_T Cxx + nu_T E^T X / n)`` (k x d), constant along the
student's run. Given X, each row of ``E^T X / n`` is exactly ``N(0, Cxx / n)``, so it is
drawn as ``Z Cxx^{1/2} / sqrt(n)`` with Z standard normal (k x d): the same law as
drawing the n x k soft-label noise E, at O(k d^2) instead of O(n k d) per particle.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import langevin, streams
from .config import LangevinNumeric, Numeric, Static
from .tasks import linear_gaussian as lg

HIGHEST = jax.lax.Precision.HIGHEST


class Populations(NamedTuple):
    """Final particle states, leading axes ``(E, P)``."""

    teacher: np.ndarray           # (E, P, k, d)
    student: np.ndarray           # (E, P, k, d) W_S = V Pi^T (float64)
    student_sub: np.ndarray       # (E, P, k, r) V, the student's own coordinates
    diverged_T: np.ndarray        # (E, P) bool
    diverged_S: np.ndarray        # (E, P) bool
    diverged_step_T: np.ndarray   # (E, P) int32, -1 if finite
    diverged_step_S: np.ndarray   # (E, P) int32


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


def _normals(keys: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """``(E, P) + shape`` standard normals, one draw per key (flat vmap: fast to compile)."""
    E, P = keys.shape
    draws = jax.vmap(lambda k: streams.normal(k, shape, dtype))(keys.reshape(-1))
    return draws.reshape((E, P) + tuple(shape))


def _quadratic_population(keys_init, keys_noise, C, B, p: LangevinNumeric, num_steps: int,
                          shared_B: bool):
    """Chains on ``U(W) = gamma [0.5 tr(W C W^T) - tr(B W^T)] + ||W||^2 / (2 s0^2)``.

    Args:
      keys_init, keys_noise: ``(E, P)``; C: ``(E, q, q)`` per dataset; B: ``(E, k, q)``
        per dataset if ``shared_B`` (teachers) else ``(E, P, k, q)`` per particle
        (students, whose target depends on their partner).
    Returns:
      the final :class:`~kdsim.langevin.LangevinState`, leading axes ``(E, P)``.
    """

    def grad_energy(w, batch):
        (C_e, B_e), B_i = batch
        return p.gamma * lg.quadratic_grad(w, C_e, B_e if shared_B else B_i) + w / p.prior_scale**2

    kernel = langevin.build_kernel(grad_energy, langevin.constant_schedule(p.step_size))
    w0 = p.init_scale * _normals(keys_init, B.shape[-2:], B.dtype)
    state = jax.vmap(jax.vmap(kernel.init))(w0)
    dataset_batch, particle_batch = ((C, B), None) if shared_B else ((C, None), B)
    state, _ = langevin.run_population(kernel, keys_noise, state, 0, num_steps,
                                       batch=dataset_batch, particle_batch=particle_batch)
    return state


# Static arguments are only the step counts: shapes and dtypes come from the arrays, so
# runs that differ in n, or in any numeric field, share one compiled program.


@partial(jax.jit, static_argnames=("num_steps",))
def _linear_teachers(root, datasets, particles, Cxx, Cyx, p: LangevinNumeric, *, num_steps: int):
    keys_init = streams.particle_keys(root, "teacher_init", datasets, particles)
    keys_noise = streams.particle_keys(root, "teacher_noise", datasets, particles)
    return _quadratic_population(keys_init, keys_noise, Cxx, Cyx, p, num_steps, shared_B=True)


@partial(jax.jit, static_argnames=("num_steps",))
def _linear_students(root, datasets, particles, teacher, Cp, CyxPi, CxxPi, NoisePi,
                     p: LangevinNumeric, alpha, teacher_noise, *, num_steps: int):
    """Students in their own coordinates V (k x r); per-dataset matrices are
    ``Cp = Pi^T Cxx Pi``, ``CyxPi = Cyx Pi``, ``CxxPi = Cxx Pi``,
    ``NoisePi = Cxx^{1/2} Pi / sqrt(n)``."""
    k = CyxPi.shape[-2]
    d = CxxPi.shape[-2]
    keys_init = streams.particle_keys(root, "student_init", datasets, particles)
    keys_noise = streams.particle_keys(root, "student_noise", datasets, particles)
    z = _normals(streams.particle_keys(root, "soft_label", datasets, particles), (k, d), Cp.dtype)
    # the distillation target of each student, frozen for its whole run: (E, P, k, r)
    B = alpha * CyxPi[:, None] + (1 - alpha) * (
        jnp.einsum("epkd,edr->epkr", teacher, CxxPi, precision=HIGHEST)
        + teacher_noise * jnp.einsum("epkd,edr->epkr", z, NoisePi, precision=HIGHEST))
    return _quadratic_population(keys_init, keys_noise, Cp, B, p, num_steps, shared_B=False)


def symmetric_sqrt(C: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root of a batch of symmetric matrices ``(..., d, d)``."""
    vals, vecs = np.linalg.eigh(C)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))[..., None, :]) @ np.swapaxes(vecs, -1, -2)


def run_linear(root: jax.Array, static: Static, numeric: Numeric, data: lg.LinearData,
               datasets: np.ndarray, particles: np.ndarray) -> Populations:
    """Train the teacher then the student populations of the linear task.

    Args:
      root: the run's root key.
      datasets: ``(E,)`` global dataset indices (rows of ``data``).
      particles: ``(P,)`` global particle indices.
    """
    dtype = jnp.dtype(static.dtype)
    with jax.enable_x64(static.dtype == "float64"):
        ds = jnp.asarray(datasets, jnp.uint32)
        ps = jnp.asarray(particles, jnp.uint32)
        Cxx, Cyx = _cast(data.Cxx, dtype), _cast(data.Cyx, dtype)
        teachers = _linear_teachers(root, ds, ps, Cxx, Cyx, _cast(numeric.teacher, dtype),
                                    num_steps=static.teacher_steps)
        Pi, PiT = data.Pi, np.swapaxes(data.Pi, -1, -2)
        per_dataset = (PiT @ data.Cxx @ Pi, data.Cyx @ Pi, data.Cxx @ Pi,
                       symmetric_sqrt(data.Cxx) @ Pi / np.sqrt(static.n))
        students = _linear_students(
            root, ds, ps, teachers.position, *_cast(per_dataset, dtype),
            _cast(numeric.student, dtype), _cast(numeric.alpha, dtype),
            _cast(numeric.teacher_noise, dtype), num_steps=static.student_steps)
        teacher_w = np.asarray(teachers.position)
        student_v = np.asarray(students.position)
    student_w = np.einsum("epkr,edr->epkd", student_v.astype(np.float64), data.Pi)
    return Populations(
        teacher=teacher_w, student=student_w, student_sub=student_v,
        diverged_T=np.asarray(teachers.diverged), diverged_S=np.asarray(students.diverged),
        diverged_step_T=np.asarray(teachers.diverged_step),
        diverged_step_S=np.asarray(students.diverged_step))
