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


def _langevin_chain(key_init: jax.Array, key_noise: jax.Array, C: jax.Array, B: jax.Array, *,
                    shape: tuple[int, ...], p: LangevinNumeric, num_steps: int,
                    dtype) -> langevin.LangevinState:
    """One chain on ``U(W) = gamma [0.5 tr(W C W^T) - tr(B W^T)] + ||W||^2 / (2 s0^2)``."""

    def grad_energy(w, _):
        return p.gamma * lg.quadratic_grad(w, C, B) + w / p.prior_scale**2

    kernel = langevin.build_kernel(grad_energy, langevin.constant_schedule(p.step_size))
    w0 = p.init_scale * jax.random.normal(key_init, shape, dtype)
    state, _ = langevin.run(kernel, key_noise, kernel.init(w0), 0, num_steps)
    return state


@partial(jax.jit, static_argnames=("static",))
def _linear_teachers(root, datasets, particles, Cxx, Cyx, p: LangevinNumeric, *, static: Static):
    dtype = jnp.dtype(static.dtype)
    keys_init = streams.particle_keys(root, "teacher_init", datasets, particles)
    keys_noise = streams.particle_keys(root, "teacher_noise", datasets, particles)
    chain = partial(_langevin_chain, shape=(static.k, static.d), p=p,
                    num_steps=static.teacher_steps, dtype=dtype)
    per_dataset = jax.vmap(chain, in_axes=(0, 0, None, None))
    return jax.vmap(per_dataset)(keys_init, keys_noise, Cxx, Cyx)


@partial(jax.jit, static_argnames=("static",))
def _linear_students(root, datasets, particles, teacher, Cp, CyxPi, CxxPi, NoisePi,
                     p: LangevinNumeric, alpha, teacher_noise, *, static: Static):
    """Students in their own coordinates V (k x r); per-dataset matrices are
    ``Cp = Pi^T Cxx Pi``, ``CyxPi = Cyx Pi``, ``CxxPi = Cxx Pi``,
    ``NoisePi = Cxx^{1/2} Pi / sqrt(n)``."""
    dtype = jnp.dtype(static.dtype)
    keys_init = streams.particle_keys(root, "student_init", datasets, particles)
    keys_noise = streams.particle_keys(root, "student_noise", datasets, particles)
    keys_soft = streams.particle_keys(root, "soft_label", datasets, particles)

    def one(k_init, k_noise, k_soft, w_t, Cp, CyxPi, CxxPi, NoisePi):
        z = jax.random.normal(k_soft, (static.k, static.d), dtype)
        B = alpha * CyxPi + (1 - alpha) * (
            jnp.matmul(w_t, CxxPi, precision=HIGHEST)
            + teacher_noise * jnp.matmul(z, NoisePi, precision=HIGHEST))
        return _langevin_chain(k_init, k_noise, Cp, B, shape=(static.k, static.rank), p=p,
                               num_steps=static.student_steps, dtype=dtype)

    per_dataset = jax.vmap(one, in_axes=(0, 0, 0, 0, None, None, None, None))
    return jax.vmap(per_dataset)(keys_init, keys_noise, keys_soft, teacher, Cp, CyxPi, CxxPi,
                                 NoisePi)


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
                                    static=static)
        Pi, PiT = data.Pi, np.swapaxes(data.Pi, -1, -2)
        per_dataset = (PiT @ data.Cxx @ Pi, data.Cyx @ Pi, data.Cxx @ Pi,
                       symmetric_sqrt(data.Cxx) @ Pi / np.sqrt(static.n))
        students = _linear_students(
            root, ds, ps, teachers.position, *_cast(per_dataset, dtype),
            _cast(numeric.student, dtype), _cast(numeric.alpha, dtype),
            _cast(numeric.teacher_noise, dtype), static=static)
        teacher_w = np.asarray(teachers.position)
        student_v = np.asarray(students.position)
    student_w = np.einsum("epkr,edr->epkd", student_v.astype(np.float64), data.Pi)
    return Populations(
        teacher=teacher_w, student=student_w, student_sub=student_v,
        diverged_T=np.asarray(teachers.diverged), diverged_S=np.asarray(students.diverged),
        diverged_step_T=np.asarray(teachers.diverged_step),
        diverged_step_S=np.asarray(students.diverged_step))
