"""Two-phase training of teacher and student populations (SPEC §2).

E datasets x P particles advance together: energies are written for ONE particle of
ONE dataset; :func:`kdsim.langevin.run_population` vmaps them over particles and
datasets and scans over steps.

Phase 1 runs the teachers. Phase 2 runs each student particle against its partner's
FINAL teacher state, frozen for the whole student run, with its own soft-label noise
drawn once. Teacher and student particle ``i`` of dataset ``e`` are a pair: this
pairing is the coupling of the two training processes. Optionally the same students
are also trained from scratch (``alpha = 1``, same random draws: common random numbers
make the KD-versus-scratch comparison sharp), and the Girsanov path-space bound
``sum_t (h/4) ||grad U_S(w_t) - grad U_T(w_t)||^2`` is accumulated along each student's run;
the trajectory-bound sums (:mod:`kdsim.trajectory`) ride in the same scans of both phases.

Linear fast path: the student's distillation target only enters the gradient through
``T = alpha Cyx + (1 - alpha)(W_T Cxx + nu_T E^T X / n)`` (k x d), constant along the
student's run. Given X, each row of ``E^T X / n`` is exactly ``N(0, Cxx / n)``, so it is
drawn as ``Z Cxx^{1/2} / sqrt(n)`` with Z standard normal (k x d): the same law as
drawing the n x k soft-label noise E, at O(k d^2) instead of O(n k d) per particle.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import langevin, losses, sharding, streams
from . import trajectory as traj_mod
from .config import LangevinNumeric, Resolved
from .models import Prepared
from .progress import NullProgress, Progress, segments
from .tasks import linear_gaussian as lg

HIGHEST = jax.lax.Precision.HIGHEST


class Populations(NamedTuple):
    """Final particle states, leading axes ``(E, P)``.

    Linear task: parameters are ``(E, P, k, d)`` arrays; MLP tasks: flax parameter
    pytrees whose leaves have leading axes ``(E, P)``.
    """

    teacher: Any                  # linear (E, P, k, d); MLP pytree
    student: Any                  # linear W_S = V Pi^T (float64); MLP pytree
    student_sub: np.ndarray | None   # linear: V (E, P, k, r), the student's own coordinates
    scratch: Any                  # the student trained with alpha = 1 (same draws), or None
    diverged_T: np.ndarray        # (E, P) bool
    diverged_S: np.ndarray        # (E, P) bool
    diverged_scratch: np.ndarray  # (E, P) bool (all False without a scratch run)
    diverged_step_T: np.ndarray   # (E, P) int32, -1 if finite
    diverged_step_S: np.ndarray   # (E, P) int32
    girsanov: np.ndarray | None   # (E, P) path-space KL bound of each student's run
    seconds: dict                 # wall time of each phase
    traj_teacher: np.ndarray | None = None  # (E, P, 2) trajectory sums of the teacher phase
    traj_student: np.ndarray | None = None  # (E, P, 2) of the student phase (kdsim.trajectory)


def map_arrays(fn: Callable, *pops: Populations) -> dict:
    """``{field: fn(*arrays)}`` over the array fields of populations, leaf by leaf for
    MLP parameter pytrees; a field that is None stays None. (``seconds`` is left out.)"""
    fields = {}
    for name in Populations._fields:
        if name == "seconds":
            continue
        values = [getattr(p, name) for p in pops]
        fields[name] = None if values[0] is None else jax.tree_util.tree_map(fn, *values)
    return fields


def concatenate(parts: list[Populations], num_particles: int) -> Populations:
    """Join populations trained on consecutive particle chunks (along the particle axis),
    keeping the first ``num_particles`` (a padded last chunk is cut)."""
    fields = map_arrays(
        lambda *a: np.concatenate([np.asarray(x) for x in a], axis=1)[:, :num_particles], *parts)
    seconds = {}
    for p in parts:
        for k, v in p.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
    return Populations(**fields, seconds=seconds)


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


def _normals(keys: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """``(E, P) + shape`` standard normals, one draw per key (flat vmap: fast to compile)."""
    E, P = keys.shape
    draws = jax.vmap(lambda k: streams.normal(k, shape, dtype))(keys.reshape(-1))
    return draws.reshape((E, P) + tuple(shape))


def _sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(tree))


def _segment(p: LangevinNumeric, grad_energy: Callable, state, acc, keys_noise: jax.Array,
             start, num_steps: int, data: Any, targets: Any = None, girsanov: bool = False, *,
             schedule: str = "constant", phase_steps: int = 1, leaf_scales: Any = None,
             traj: Callable | None = None):
    """Advance a population (leading axes ``(E, P)``) over global steps ``start ..``.

    Args:
      grad_energy: ``(w, data_e, target_i) -> grad U(w)`` for one particle; with
        ``girsanov``, ``-> (grad U(w), grad U(w) - grad U_T(w))`` and the path-space bound
        ``sum_t (h_t/4) ||grad U(w_t) - grad U_T(w_t)||^2`` is accumulated into ``acc``.
      data: per-dataset pytree (leading axis E); targets: per-particle pytree
        (leading axes ``(E, P)``) or None.
      schedule, phase_steps: the step-size schedule (:func:`kdsim.langevin.schedule`) over
        the whole phase of ``phase_steps`` steps (the segment is a part of it).
      leaf_scales: per-leaf ``s_leaf`` of the particles (None: all ones), for the escape
        region of :func:`kdsim.langevin.escape_limit`.
      traj: optional trajectory accumulator ``(acc_traj, pre_state, info, batch) -> acc_traj``
        (:func:`kdsim.trajectory.build`); then ``acc`` is the pair ``(girsanov_acc or None,
        acc_traj)``, carried in the same scan.
    Returns:
      ``(LangevinState, acc)``.
    """
    # a chain leaving the region no healthy chain reaches is diverged too, before it overflows
    one = jax.tree_util.tree_map(lambda x: x[0, 0], state.position)
    escaped = langevin.region_test(
        p.prior_scale, langevin.escape_limit(one, p.gamma, p.prior_scale, p.init_scale, leaf_scales),
        leaf_scales)
    kernel = langevin.build_kernel(
        lambda w, b: grad_energy(w, b[0], b[1]),
        langevin.schedule(schedule, p.step_size, phase_steps, p.schedule_offset), has_aux=girsanov,
        escaped=escaped)
    if not girsanov and traj is None:
        state, _ = langevin.run_population(kernel, keys_noise, state, start, num_steps,
                                           batch=data, particle_batch=targets)
        return state, acc

    def girsanov_term(acc, info):
        return acc + 0.25 * info.step_size * _sq_norm(info.aux)

    def accumulate(acc, pre, info, batch):
        if traj is None:
            return girsanov_term(acc, info)
        acc_g, acc_t = acc
        return (girsanov_term(acc_g, info) if girsanov else acc_g), traj(acc_t, pre, info, batch)

    return langevin.run_population(kernel, keys_noise, state, start, num_steps, batch=data,
                                   particle_batch=targets, accumulate=accumulate, acc_init=acc)


def _initial_state(w0) -> langevin.LangevinState:
    E, P = jax.tree_util.tree_leaves(w0)[0].shape[:2]
    return langevin.LangevinState(w0, jnp.zeros((E, P), bool), jnp.full((E, P), -1, jnp.int32))


def _advance(segment_fn, state, acc, total_steps: int, progress: Progress, phase: str, **kw):
    """The host loop over jitted scan segments (progress is reported between them)."""
    for start, length in segments(total_steps):
        state, acc = segment_fn(state, acc, jnp.int32(start), num_steps=length,
                                phase_steps=total_steps, **kw)
        if progress.bar is not None:
            jax.block_until_ready(state.position)
            progress.update(length, phase)
    return state, acc


def _keys(root, name, datasets, particles):
    return streams.particle_keys(root, name, datasets, particles)


# ---------------------------------------------------------------------------------------
# linear task. Static arguments are only step counts and flags: shapes and dtypes come
# from the arrays, so runs that differ in n or in any numeric field share one program.


def _linear_grad(p: LangevinNumeric):
    """``grad U(W) = gamma (W C - B) + W / s0^2`` for data ``(C, B_shared)`` or target B."""

    def grad(w, data, target):
        C, B_shared = data[0], data[1]
        B = B_shared if target is None else target
        return p.gamma * lg.quadratic_grad(w, C, B) + w / p.prior_scale**2

    return grad


@partial(jax.jit, static_argnames=("shape", "init_stream", "noise_stream"))
def _linear_init(root, datasets, particles, init_scale, like, *, shape, init_stream, noise_stream):
    """Initial states ``N(0, s_init^2)`` of shape ``(E, P) + shape`` and the noise keys."""
    w0 = init_scale * _normals(_keys(root, init_stream, datasets, particles), shape, like.dtype)
    return _initial_state(w0), _keys(root, noise_stream, datasets, particles)


@jax.jit
def _linear_targets(root, datasets, particles, teacher, CyxPi, CxxPi, NoisePi, alpha, teacher_noise):
    """Each student's distillation target, frozen for its whole run: ``(E, P, k, r)``.

    Per-dataset matrices: ``CyxPi = Cyx Pi``, ``CxxPi = Cxx Pi``, ``NoisePi = Cxx^{1/2} Pi / sqrt(n)``."""
    k, d = CyxPi.shape[-2], CxxPi.shape[-2]
    z = _normals(_keys(root, "soft_label", datasets, particles), (k, d), CxxPi.dtype)
    per_particle = lambda W, C: jnp.einsum("epkd,edr->epkr", W, C, precision=HIGHEST)
    return alpha * CyxPi[:, None] + (1 - alpha) * (
        per_particle(teacher, CxxPi) + teacher_noise * per_particle(z, NoisePi))


@partial(jax.jit, static_argnames=("num_steps", "shared_B", "girsanov", "schedule", "phase_steps",
                                   "traj_m"))
def _linear_segment(state, acc, start, keys_noise, C, B, Cxx, Cyx, p: LangevinNumeric,
                    p_T: LangevinNumeric, examples=None, soft=None, alpha=None, *, num_steps: int,
                    shared_B: bool, girsanov: bool, schedule: str, phase_steps: int,
                    traj_m: int = 0):
    """Teachers (``shared_B``: B = Cyx per dataset) or students (B per particle, in their
    own coordinates V). With ``girsanov`` (full student, Pi = I) the teacher's energy
    gradient ``gamma_T (W Cxx - Cyx) + W / s0_T^2`` is compared along the run.

    With ``traj_m`` > 0 the trajectory sums (:mod:`kdsim.trajectory`, ``traj_m`` examples
    per step) ride in the same scan: ``examples`` are the per-dataset ``(X, Y)`` (teacher)
    or ``(X Pi, Y)`` (student, ``(E, n, r)`` and ``(E, n, k)``), ``soft`` the students'
    soft labels ``X W_T^T + nu_T E`` of their partners ``(E, P, n, k)``."""
    grad = _linear_grad(p)

    def with_teacher(w, data, target):
        g = grad(w, data, target)
        g_T = p_T.gamma * lg.quadratic_grad(w, data[2], data[3]) + w / p_T.prior_scale**2
        return g, g - g_T

    energy = with_teacher if girsanov else grad
    data = (C, B if shared_B else None, Cxx, Cyx)
    targets = None if shared_B else B
    traj = None
    if traj_m:
        data, targets, base = data + (examples,), (targets, soft), energy
        energy = lambda w, d, t: base(w, d[:4], t[0])
        if shared_B:     # teacher: the task loss of one example, W x
            loss_i = lambda w, e: losses.squared_loss(w @ e[0], e[1])
            examples_of = lambda b: b[0][4]
        else:            # student in its coordinates V: f = V (Pi^T x)
            loss_i = lambda v, e: (alpha * losses.squared_loss(v @ e[0], e[1])
                                   + (1 - alpha) * losses.kd_regression(v @ e[0], e[2]))
            examples_of = lambda b: (b[0][4][0], b[0][4][1], b[1][1])
        prior_grad = jax.grad(lambda w: 0.5 * jnp.sum(w * w) / p.prior_scale**2)
        acc_fn = traj_mod.build(loss_i, p.gamma, prior_grad, examples[0].shape[1], traj_m)
        traj = lambda a, pre, info, b: acc_fn(a, pre, info, b, examples_of(b))
    return _segment(p, energy, state, acc, keys_noise, start, num_steps, data, targets, girsanov,
                    schedule=schedule, phase_steps=phase_steps, traj=traj)


@partial(jax.jit, static_argnames=("k",))
def _linear_channel_noise(root, datasets, particles, X, SqrtCxx, PinvCxx, *, k: int):
    """Per-example soft-label noise ``E (E, P, n, k)`` of each student, consistent with the
    sufficient statistic the fast path drew (:func:`_linear_targets`).

    The fast path draws only ``S = E^T X / n = Z Cxx^{1/2} / sqrt(n)``. Given S, the
    projection ``H E = X Cxx^+ S^T`` onto the column space of X is fixed, and
    ``(I - H) E`` is independent of it with the law of ``(I - H) Z'`` for fresh standard
    normals Z' (stream ``soft_label_rest``): ``E = X Cxx^+ S^T + (I - H) Z'`` has exactly
    the joint law of the n x k noise and its statistic. Only the trajectory sums use it.
    """
    E, n, d = X.shape
    z = _normals(_keys(root, "soft_label", datasets, particles), (k, d), X.dtype)
    S = jnp.einsum("epkd,edc->epkc", z, SqrtCxx, precision=HIGHEST) / jnp.sqrt(n)
    fixed = jnp.einsum("end,edc,epkc->epnk", X, PinvCxx, S, precision=HIGHEST)
    rest = _normals(_keys(root, "soft_label_rest", datasets, particles), (n, k), X.dtype)
    back = jnp.einsum("end,epnk->epdk", X, rest, precision=HIGHEST) / n
    rest = rest - jnp.einsum("end,edc,epck->epnk", X, PinvCxx, back, precision=HIGHEST)
    return fixed + rest


def symmetric_sqrt(C: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root of a batch of symmetric matrices ``(..., d, d)``."""
    vals, vecs = np.linalg.eigh(C)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))[..., None, :]) @ np.swapaxes(vecs, -1, -2)


def run_linear(root: jax.Array, res: Resolved, data: lg.LinearData, datasets: np.ndarray,
               particles: np.ndarray, progress: Progress | None = None) -> Populations:
    """Train the teacher, student (and scratch student) populations of the linear task.

    Args:
      root: the run's root key.
      datasets: ``(E,)`` global dataset indices (rows of ``data``).
      particles: ``(P,)`` global particle indices.
      progress: host-side progress reporting (between scan segments).
    """
    static, numeric = res.static, res.numeric
    progress = progress or NullProgress()
    dtype = jnp.dtype(static.dtype)
    k, d, r = static.k, static.d, static.rank
    seconds = {}
    lay = sharding.layout(len(datasets), len(particles))
    with jax.enable_x64(static.dtype == "float64"):
        ds = jnp.asarray(datasets, jnp.uint32)
        ps = jnp.asarray(particles, jnp.uint32)
        Cxx, Cyx = lay.datasets(_cast((data.Cxx, data.Cyx), dtype))
        p_T, p_S = _cast(numeric.teacher, dtype), _cast(numeric.student, dtype)
        traj_m = static.trajectory_examples if static.trajectory else 0
        X, Y = lay.datasets(_cast((data.X, data.Y), dtype))
        n_ex = static.n

        def traj_init(stream):
            return (None, lay.particles(traj_mod.init(_keys(root, stream, ds, ps), n_ex, dtype)))

        t0 = time.perf_counter()
        state, keys = lay.particles(_linear_init(
            root, ds, ps, p_T.init_scale, Cxx, shape=(k, d), init_stream="teacher_init",
            noise_stream="teacher_noise"))
        teachers, acc_T = _advance(_linear_segment, state, traj_init("trajectory_T") if traj_m else None,
                                   static.teacher_steps, progress, "teacher", keys_noise=keys, C=Cxx,
                                   B=Cyx, Cxx=Cxx, Cyx=Cyx, p=p_T, p_T=p_T, shared_B=True,
                                   girsanov=False, schedule=static.teacher_schedule,
                                   examples=(X, Y) if traj_m else None, traj_m=traj_m)
        traj_T = np.asarray(acc_T[1].sums, np.float64) if traj_m else None
        teacher_w = np.asarray(teachers.position)
        seconds["teacher"] = time.perf_counter() - t0
        Pi, PiT = data.Pi, np.swapaxes(data.Pi, -1, -2)
        Cp, CyxPi, CxxPi, NoisePi = lay.datasets(_cast((
            PiT @ data.Cxx @ Pi, data.Cyx @ Pi, data.Cxx @ Pi,
            symmetric_sqrt(data.Cxx) @ Pi / np.sqrt(static.n)), dtype))

        def student(alpha, teacher_noise, girsanov, phase, traj_m=0):
            B = _linear_targets(root, ds, ps, teachers.position, CyxPi, CxxPi, NoisePi,
                                _cast(alpha, dtype), _cast(teacher_noise, dtype))
            state, keys = lay.particles(_linear_init(
                root, ds, ps, p_S.init_scale, Cp, shape=(k, r), init_stream="student_init",
                noise_stream="student_noise"))
            acc = lay.particles(jnp.zeros((len(datasets), len(particles)), dtype)) if girsanov else None
            extra = {}
            if traj_m:   # the partners' soft labels X W_T^T + nu_T E, frozen like B
                acc = (acc, traj_init("trajectory_S")[1])
                soft = jnp.einsum("end,epkd->epnk", X, teachers.position, precision=HIGHEST)
                if teacher_noise != 0:
                    soft = soft + _cast(teacher_noise, dtype) * _linear_channel_noise(
                        root, ds, ps, X, SqrtCxx, PinvCxx, k=k)
                extra = dict(examples=(XPi, Y), soft=soft, alpha=_cast(alpha, dtype))
            state, acc = _advance(_linear_segment, state, acc, static.student_steps, progress, phase,
                                  keys_noise=keys, C=Cp, B=B, Cxx=Cxx, Cyx=Cyx, p=p_S, p_T=p_T,
                                  shared_B=False, girsanov=girsanov, schedule=static.student_schedule,
                                  traj_m=traj_m, **extra)
            if traj_m:
                return state, acc[0], np.asarray(acc[1].sums, np.float64)
            return state, acc, None

        # The linear accumulator is cheap, so a full student always carries it (a static
        # property of the shapes): whether Girsanov applies depends on numeric fields
        # (step sizes, initial scales), and flipping it must not recompile.
        accumulate = static.full_student
        # no student steps, no sums: skip the partners' (E, P, n, k) soft labels
        traj_S_m = traj_m if static.student_steps > 0 else 0
        XPi = lay.datasets(_cast(data.X @ data.Pi, dtype)) if traj_S_m else None
        if traj_S_m and numeric.teacher_noise != 0:
            SqrtCxx, PinvCxx = lay.datasets(_cast((symmetric_sqrt(data.Cxx),
                                                   np.linalg.pinv(data.Cxx, hermitian=True)), dtype))
        t0 = time.perf_counter()
        students, girsanov, traj_S = student(numeric.alpha, numeric.teacher_noise, accumulate,
                                             "student", traj_S_m)
        if traj_m and not traj_S_m:
            traj_S = np.zeros(teacher_w.shape[:2] + (2,))
        if not res.girsanov:
            girsanov = None
        student_v = np.asarray(students.position)
        seconds["student"] = time.perf_counter() - t0
        scratch_w, div_scratch = None, np.zeros(teacher_w.shape[:2], bool)
        if res.scratch:
            t0 = time.perf_counter()
            # same static flags as the KD student (its Girsanov sum is discarded): one
            # compiled program serves both runs
            scratch, _, _ = student(1.0, 0.0, accumulate, "scratch")
            scratch_w = np.einsum("epkr,edr->epkd", np.asarray(scratch.position, np.float64),
                                  data.Pi)
            div_scratch = np.asarray(scratch.diverged)
            seconds["scratch"] = time.perf_counter() - t0
    student_w = np.einsum("epkr,edr->epkd", student_v.astype(np.float64), data.Pi)
    return Populations(
        teacher=teacher_w, student=student_w, student_sub=student_v, scratch=scratch_w,
        diverged_T=np.asarray(teachers.diverged), diverged_S=np.asarray(students.diverged),
        diverged_scratch=div_scratch,
        diverged_step_T=np.asarray(teachers.diverged_step),
        diverged_step_S=np.asarray(students.diverged_step),
        girsanov=None if girsanov is None else np.asarray(girsanov, np.float64),
        seconds=seconds, traj_teacher=traj_T, traj_student=traj_S)


# ---------------------------------------------------------------------------------------
# any model (MLP, CNN, user modules): gradients by autodiff of the energy of ONE particle


class ModelData(NamedTuple):
    """What the engine needs of a task with a model: per-dataset training data."""

    X: Any                 # (E, n, *input_shape)
    Y: Any                 # (E, n, k) float, or (E, n) int labels
    classification: bool


def _prior_term(w, inv_var) -> jax.Array:
    """``sum_leaf ||w_leaf||^2 / (2 s0^2 s_leaf^2)`` (``inv_var``: per-leaf ``1/(s0 s_leaf)^2``)."""
    return 0.5 * sum(jnp.sum(c * x * x) for x, c in zip(jax.tree_util.tree_leaves(w),
                                                          jax.tree_util.tree_leaves(inv_var)))


def _inverse_variances(p: LangevinNumeric, scales) -> Any:
    return jax.tree_util.tree_map(lambda s: 1.0 / (p.prior_scale * s) ** 2, scales)


def teacher_energy_grad(apply: Callable, classification: bool, p: LangevinNumeric, inv_var):
    """``grad U_T`` for one particle by autodiff:
    ``U_T(w) = gamma_T Lhat_D(w) + sum_leaf ||w_leaf||^2 / (2 s0^2 s_leaf^2)``.

    Returns ``grad(w, (X, Y), target=None)``.
    """
    def energy(w, X, Y):
        return p.gamma * losses.task_risk(apply(w, X), Y, classification) + _prior_term(w, inv_var)

    def grad(w, data, _target=None):
        return jax.grad(energy)(w, data[0], data[1])

    return grad


def student_energy_grad(apply: Callable, classification: bool, p: LangevinNumeric,
                        p_T: LangevinNumeric, alpha, tau, inv_var, inv_var_T, girsanov: bool):
    """Gradient of the student's energy (SPEC §2) for one particle, by autodiff:
    ``U_S(w) = gamma_S [alpha Lhat(w) + (1 - alpha) Lkd(w; target)] + prior``.

    Returns ``grad(w, (X, Y), target)``; with ``girsanov`` it returns
    ``(grad U_S(w), grad U_S(w) - grad U_T(w))`` (the teacher's energy at the same w,
    which needs the same parameter structure). One ``jax.vjp`` of the model serves both:
    the two gradients are its pullbacks of two output cotangents.
    """
    def grad(w, data, target):
        X, Y = data[0], data[1]
        f, pullback = jax.vjp(lambda v: apply(v, X), w)
        d_task = jax.grad(lambda f: losses.task_risk(f, Y, classification))(f)
        # alpha = 1 (the scratch student) skips the distillation term entirely
        d_kd = jax.lax.cond(
            alpha < 1, lambda: jax.grad(lambda f: losses.kd_risk(f, target, tau, classification))(f),
            lambda: jnp.zeros_like(f))
        cot_S = p.gamma * (alpha * d_task + (1 - alpha) * d_kd)
        prior_S = jax.grad(_prior_term)(w, inv_var)
        (g_S,) = pullback(cot_S)
        g_S = jax.tree_util.tree_map(jnp.add, g_S, prior_S)
        if not girsanov:
            return g_S
        (g_diff,) = pullback(cot_S - p_T.gamma * d_task)
        prior_diff = jax.tree_util.tree_map(jnp.subtract, prior_S, jax.grad(_prior_term)(w, inv_var_T))
        return g_S, jax.tree_util.tree_map(jnp.add, g_diff, prior_diff)

    return grad


@partial(jax.jit, static_argnames=("structure", "init_stream", "noise_stream", "dtype"))
def _model_init(root, datasets, particles, init_scale, scales, *, structure, init_stream,
                noise_stream, dtype):
    """Initial parameter pytrees ``N(0, (s_init s_leaf)^2)`` (leaves ``(E, P, ...)``) and
    the noise keys."""
    keys = _keys(root, init_stream, datasets, particles)
    E, P = keys.shape
    zeros = structure.zeros(dtype)
    flat = jax.vmap(lambda k: jax.tree_util.tree_map(
        lambda z, s: init_scale * s * z, langevin.gaussian_like(k, zeros), scales))(keys.reshape(-1))
    w0 = jax.tree_util.tree_map(lambda x: x.reshape((E, P) + x.shape[1:]), flat)
    return _initial_state(w0), _keys(root, noise_stream, datasets, particles)


@partial(jax.jit, static_argnames=("apply", "classification"))
def _model_targets(root, datasets, particles, teacher, X, teacher_noise, tau, *, apply,
                   classification):
    """Per-student targets ``(E, P, n, out)``, computed once from the frozen partner:
    tempered teacher probabilities (classification) or soft labels ``f_T(x) + nu_T e``."""
    f_T = jax.vmap(lambda w_e, X_e: jax.vmap(apply, in_axes=(0, None))(w_e, X_e))(teacher, X)
    target = losses.soft_targets(f_T, tau, classification)
    if classification:
        return target
    e = _normals(_keys(root, "soft_label", datasets, particles), f_T.shape[2:], f_T.dtype)
    return target + teacher_noise * e


@partial(jax.jit, static_argnames=("apply", "classification", "num_steps", "girsanov",
                                   "schedule", "phase_steps", "traj_m"))
def _model_segment(state, acc, start, keys_noise, X, Y, target, p: LangevinNumeric,
                   p_T: LangevinNumeric, alpha, tau, scales, scales_T, *, apply, classification,
                   num_steps: int, girsanov: bool, schedule: str, phase_steps: int,
                   traj_m: int = 0):
    """Teachers (``target`` None) or students over one segment of steps; ``scales`` are
    the particles' per-leaf ``s_leaf``, ``scales_T`` the teacher's (Girsanov). With
    ``traj_m`` > 0 the trajectory sums (:mod:`kdsim.trajectory`) ride in the same scan."""
    inv_var = _inverse_variances(p, scales)
    if target is None:
        grad = teacher_energy_grad(apply, classification, p, inv_var)
    else:
        grad = student_energy_grad(apply, classification, p, p_T, alpha, tau, inv_var,
                                   _inverse_variances(p_T, scales_T), girsanov)
    traj = None
    if traj_m:
        task = losses.task_loss(classification)
        one = lambda w, x: apply(w, x[None])[0]
        if target is None:    # the task loss of one example
            loss_i = lambda w, e: task(one(w, e[0]), e[1])
            examples_of = lambda b: (b[0][0], b[0][1])
        else:                 # the student's whole objective on one example, same partner
            kd = ((lambda f, t: losses.kd_classification(f, t, tau)) if classification
                  else losses.kd_regression)

            def loss_i(w, e):
                f = one(w, e[0])
                return alpha * task(f, e[1]) + (1 - alpha) * kd(f, e[2])
            examples_of = lambda b: (b[0][0], b[0][1], b[1])
        prior_grad = lambda w: jax.grad(_prior_term)(w, inv_var)
        acc_fn = traj_mod.build(loss_i, p.gamma, prior_grad, X.shape[1], traj_m)
        traj = lambda a, pre, info, b: acc_fn(a, pre, info, b, examples_of(b))
    return _segment(p, grad, state, acc, keys_noise, start, num_steps, (X, Y), target, girsanov,
                    schedule=schedule, phase_steps=phase_steps, leaf_scales=scales, traj=traj)


def run_model(root: jax.Array, res: Resolved, data: ModelData, datasets: np.ndarray,
              particles: np.ndarray, models: tuple[Prepared, Prepared],
              progress: Progress | None = None) -> Populations:
    """Train teacher, student (and scratch student) populations of any models."""
    st, nm = res.static, res.numeric
    progress = progress or NullProgress()
    dtype = jnp.dtype(st.dtype)
    classification = data.classification
    teacher_model, student_model = models
    seconds = {}
    lay = sharding.layout(len(datasets), len(particles))
    with jax.enable_x64(st.dtype == "float64"):
        ds = jnp.asarray(datasets, jnp.uint32)
        ps = jnp.asarray(particles, jnp.uint32)
        X = lay.datasets(_cast(data.X, dtype))
        Y = lay.datasets(jnp.asarray(data.Y) if classification else _cast(data.Y, dtype))
        p_T, p_S = _cast(nm.teacher, dtype), _cast(nm.student, dtype)
        tau = _cast(nm.temperature, dtype)
        scales_T, scales_S = teacher_model.scale_tree(dtype), student_model.scale_tree(dtype)
        common = dict(X=X, Y=Y, p_T=p_T, tau=tau, classification=classification, scales_T=scales_T)
        traj_m = st.trajectory_examples if st.trajectory else 0
        n_ex = st.n

        def traj_init(stream):
            return (None, lay.particles(traj_mod.init(_keys(root, stream, ds, ps), n_ex, dtype)))

        t0 = time.perf_counter()
        state, keys = lay.particles(_model_init(
            root, ds, ps, p_T.init_scale, scales_T, structure=teacher_model.structure,
            init_stream="teacher_init", noise_stream="teacher_noise", dtype=st.dtype))
        teachers, acc_T = _advance(_model_segment, state, traj_init("trajectory_T") if traj_m else None,
                                   st.teacher_steps, progress, "teacher", keys_noise=keys,
                                   target=None, p=p_T, alpha=_cast(1.0, dtype), scales=scales_T,
                                   apply=teacher_model.apply, girsanov=False,
                                   schedule=st.teacher_schedule, traj_m=traj_m, **common)
        jax.block_until_ready(teachers)
        traj_T = np.asarray(acc_T[1].sums, np.float64) if traj_m else None
        seconds["teacher"] = time.perf_counter() - t0

        def student(alpha, teacher_noise, girsanov, phase, traj_m=0):
            target = _model_targets(root, ds, ps, teachers.position, X, _cast(teacher_noise, dtype),
                                    tau, apply=teacher_model.apply, classification=classification)
            state, keys = lay.particles(_model_init(
                root, ds, ps, p_S.init_scale, scales_S, structure=student_model.structure,
                init_stream="student_init", noise_stream="student_noise", dtype=st.dtype))
            acc = lay.particles(jnp.zeros((len(datasets), len(particles)), dtype)) if girsanov else None
            if traj_m:
                acc = (acc, traj_init("trajectory_S")[1])
            state, acc = _advance(_model_segment, state, acc, st.student_steps, progress, phase,
                                  keys_noise=keys, target=target, p=p_S, alpha=_cast(alpha, dtype),
                                  scales=scales_S, apply=student_model.apply, girsanov=girsanov,
                                  schedule=st.student_schedule, traj_m=traj_m, **common)
            jax.block_until_ready(state)
            if traj_m:
                return state, acc[0], np.asarray(acc[1].sums, np.float64)
            return state, acc, None

        t0 = time.perf_counter()
        students, girsanov, traj_S = student(nm.alpha, nm.teacher_noise, res.girsanov, "student",
                                             traj_m)
        seconds["student"] = time.perf_counter() - t0
        scratch, div_scratch = None, np.zeros((len(datasets), len(particles)), bool)
        if res.scratch:
            t0 = time.perf_counter()
            sc, _, _ = student(1.0, 0.0, False, "scratch")
            scratch = jax.tree_util.tree_map(np.asarray, sc.position)
            div_scratch = np.asarray(sc.diverged)
            seconds["scratch"] = time.perf_counter() - t0
        to_np = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
        return Populations(
            teacher=to_np(teachers.position), student=to_np(students.position), student_sub=None,
            scratch=scratch, diverged_T=np.asarray(teachers.diverged),
            diverged_S=np.asarray(students.diverged), diverged_scratch=div_scratch,
            diverged_step_T=np.asarray(teachers.diverged_step),
            diverged_step_S=np.asarray(students.diverged_step),
            girsanov=None if girsanov is None else np.asarray(girsanov, np.float64),
            seconds=seconds, traj_teacher=traj_T, traj_student=traj_S)
