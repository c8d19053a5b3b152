"""One evaluation pipeline for every task (SPEC §12): populations -> the per-dataset
columns of API.md, the pooled bounds, and a note for every NaN or infinite column.

A task and its models are described once, by a :class:`TaskView` (per-particle gaps and
risks of every loss, parameters, predictions on the training inputs, the losses whose
sharpness B3 needs, ghost-point predictions for the function-space bounds, and the
optional closed forms); :func:`describe` builds it for the linear task
(:func:`linear_view`) and for every task with models (:func:`model_view`: planted MLP
regression and classification, pool tasks with built-in or user models). Everything
after that is common: :func:`evaluate` runs the stages of :data:`STAGES` in order over
one :class:`Context`.

Extension point. A stage is ``(timer_stage, fn)`` with
``fn(ctx: Context, so_far: Produced) -> StageOutput``: it reads the columns and
artefacts of the stages before it (``so_far``) and returns per-dataset columns
(``(E,)`` arrays), pooled rows (DataFrames indexed by ``bound`` with the columns
``value``, ``truth``, ``tightness``, ``valid``, as :func:`kdsim.bound_tables.bound_columns`
returns them), notes, and artefacts for later stages (e.g. the teacher's ball). New bound
families add a stage: ``evaluate(run, extra_stages=(("bounds", my_stage),))``, or append
to :data:`STAGES`.
Stages do the maths with the pure array functions of :mod:`kdsim.estimators` and
:mod:`kdsim.bounds` for all datasets at once; no stage loops over datasets.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import bound_tables as bt
from . import bounds
from . import closed_form, generic_tables, losses, streams
from . import function_space as fs
from .bound_tables import MIN_PAIRS, BoundInputs, Evaluation, _split, bound_columns, finish
from .config import Resolved
from .evaluation_cmi import cmi_evaluation
from .evaluation_proj import proj_evaluation
from .estimators import cgf as cgf_mod
from .estimators import divergence, predictive, sharpness
from .models import same_structure
from .stats import masked_mean_se, per_dataset
from .tasks import linear_gaussian as lg
from .tasks import mlp as mlp_task
from .tasks import pool as pool_task
from .timing import StageTimer, single_threaded_blas, timer_or_null

CHUNK = 8   # particles evaluated at once per dataset (bounds memory on large test sets)


# ---------------------------------------------------------------------------------------
# the task description


class Loss(NamedTuple):
    """One loss the gaps and bounds are reported for, per particle ``(E, P)`` (float64)."""

    suffix: str                     # "" (the task loss) or "_01" (classification's 0-1 loss)
    g_T: np.ndarray                 # gaps of the teacher particles
    g_S: np.ndarray                 # gaps of the students
    test_T: np.ndarray              # population (test) risks
    test_S: np.ndarray
    g_0: np.ndarray | None          # the scratch students (alpha = 1), or None
    test_0: np.ndarray | None
    sigma_bounded: float | None     # sigma = B of a loss in [0, B] (B1 needs no fit)
    b3_reason: str                  # "" if B3 applies (from the sharpness stage), else why not


class SharpnessProblem(NamedTuple):
    """What the teacher-sharpness program of every task needs.

    ``fns`` is hashable (a static argument of one jitted program) with methods
    ``loss(w, data_e, shared)`` (training loss) and ``gap(w, data_e, shared)`` of ONE
    particle ``w`` (a parameter pytree) on dataset ``data_e``.
    """

    fns: Any
    data: Any                  # pytree, leaves (E, ...): per-dataset arrays
    shared: Any                # pytree shared by every dataset (e.g. a pool's blocks)
    dtype: Any                 # the precision the HVPs run in
    num_iters: int
    num_probes: int
    small: bool = False        # milliseconds of work: compile with cheaper code generation


class Ghost(NamedTuple):
    """Function-space inputs: ghost points and both populations' predictions."""

    ghost: fs.Ghost
    pred_T: fs.Predictions
    pred_S: fs.Predictions
    Y: np.ndarray              # training targets (float64) or labels
    truth_exact: tuple | None  # (gen_T_F_exact, gen_S_F_exact), linear only
    klF_exact: np.ndarray | None
    b3: dict | None = None     # B3 inputs of the label channel's gap (classification)


class TaskView(NamedTuple):
    """A task and its models as the evaluation sees them (leading axes ``(E, P)``)."""

    losses: tuple[Loss, ...]
    teacher: Any                     # parameter pytree (linear: (E, P, k, d) float64)
    theta_T: np.ndarray              # (E, P, p) flat float64 teacher parameters
    theta_S: np.ndarray | None       # (E, P, p) students, None: not in the teacher's space
    param_kl: tuple[float, str]      # (value, why) of the particle KLs where theta_S is None
    convexity: np.ndarray            # (E, P) convexity bound of each pair (training inputs)
    decomposition: Callable          # (ctx) -> columns decomp_*_mc
    sharpness: SharpnessProblem
    ghost: Callable                  # (ctx, ball) -> Ghost, with B3 inputs of F (or None)
    closed_forms: Callable | None    # (ctx) -> StageOutput, the linear task's
    knn_note: str
    cgf_kind: str                    # "exact" | "empirical"
    param_count: int


class Context(NamedTuple):
    """What every stage of one run shares."""

    run: Any                  # simulate.Run
    task: TaskView
    ok: np.ndarray            # (E, P) pairs with neither member diverged
    usable: np.ndarray        # (E,) datasets with at least MIN_PAIRS surviving pairs
    n_fit: int                # the first n_fit teacher particles fit (ball, CGF); the rest check
    linear: Any               # LinearExtras (linear task) or None
    timer: StageTimer

    # the linear task's arrays, under the names the tests and benchmarks know
    @property
    def g_T(self) -> np.ndarray:
        return self.task.losses[0].g_T

    @property
    def g_S(self) -> np.ndarray:
        return self.task.losses[0].g_S

    @property
    def W_T(self) -> np.ndarray:
        return self.linear.W_T

    @property
    def W_S(self) -> np.ndarray:
        return self.linear.W_S

    @property
    def finite_time(self) -> closed_form.GaussianLaws:
        return self.linear.finite_time

    @property
    def stationary(self) -> closed_form.GaussianLaws:
        return self.linear.stationary

    @property
    def G(self) -> np.ndarray:
        return self.linear.G


class LinearExtras(NamedTuple):
    W_T: np.ndarray           # (E, P, k, d) float64
    W_S: np.ndarray           # (E, P, k, d) float64
    finite_time: closed_form.GaussianLaws
    stationary: closed_form.GaussianLaws
    G: np.ndarray             # (E, d, d) Gram of the training inputs


class StageOutput(NamedTuple):
    columns: dict
    pooled: tuple = ()        # DataFrames of pooled rows
    notes: tuple = ()
    artefacts: dict = {}      # arrays later stages need that are not columns


class Produced(NamedTuple):
    """Everything the stages before have produced."""

    columns: dict
    artefacts: dict


# ---------------------------------------------------------------------------------------
# the pipeline


def evaluate(run, timer: StageTimer | None = None, extra_stages: tuple = ()) -> Evaluation:
    """Per-dataset columns, pooled bounds and notes of one run, for any task.

    ``timer`` (optional) collects the seconds of each stage: ``closed_forms``,
    ``estimators``, ``bounds`` (the bound maths) and ``tables`` (columns and notes).
    ``extra_stages`` run after :data:`STAGES` (see the module docstring).
    """
    timer = timer_or_null(timer)
    with single_threaded_blas():
        with timer("estimators"):
            ctx, cols, notes = context(run, timer)
        pooled, art = [], {}
        for stage_name, stage in STAGES + tuple(extra_stages):
            with timer(stage_name):
                res = stage(ctx, Produced(cols, art))
            cols.update(res.columns)
            pooled += list(res.pooled)
            notes += list(res.notes)
            art.update(res.artefacts)
        with timer("tables"):
            # every row says its family (kd / generic) and the loss its truth is on
            table = generic_tables.label_rows(pd.concat(pooled or [bt._pooled_table(None, "")]),
                                              ctx.run.resolved.static.classification)
            table.index.name = "bound"
            return finish(cols, table, notes)




def describe(run) -> tuple[TaskView, LinearExtras | None]:
    """The :class:`TaskView` of a run's task."""
    if run.resolved.static.task == "linear_gaussian":
        return linear_view(run)
    return model_view(run), None


def context(run, timer: StageTimer | None = None) -> tuple[Context, dict, list[str]]:
    """The shared context, the divergence-count columns and their notes."""
    st = run.resolved.static
    pops = run.populations
    notes = []
    e = np.arange(st.num_datasets)
    cols = {"dataset": e}
    if st.supersample:      # dataset e = (supersample e // M, mask e % M), next to its index
        cols["supersample"], cols["mask"] = e // st.masks, e % st.masks
    cols["diverged_T"], cols["diverged_S"] = pops.diverged_T.sum(axis=1), pops.diverged_S.sum(axis=1)
    ok = ~pops.diverged_T & ~pops.diverged_S
    if (~ok).any():
        bad = np.flatnonzero((~ok).any(axis=1))
        notes.append(
            f"DIVERGED: {int(pops.diverged_T.sum())} teacher and {int(pops.diverged_S.sum())} "
            f"student particles blew up (non-finite) in datasets {bad.tolist()}; their pairs "
            "are excluded from every estimate. Reduce the step size.")
    usable = ok.sum(axis=1) >= MIN_PAIRS
    if not usable.all():
        notes.append(f"Monte Carlo columns are NaN in datasets {np.flatnonzero(~usable).tolist()}: "
                     f"fewer than {MIN_PAIRS} pairs survived (diverged chains).")
    task, linear = describe(run)
    n_fit = _split(st.num_particles, run.config.estimators.b3_holdout)
    ctx = Context(run, task, ok, usable, n_fit, linear, timer_or_null(timer))
    return ctx, cols, notes


# ---------------------------------------------------------------------------------------
# stages common to every task


def closed_form_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """The task's closed forms (the linear task), else nothing."""
    if ctx.task.closed_forms is None:
        return StageOutput({})
    return ctx.task.closed_forms(ctx)


def gap_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """Monte Carlo gaps and test losses of every loss, the scratch student's too."""
    pops = ctx.run.populations
    cols, notes = {}, []
    ok0 = ctx.ok & ~pops.diverged_scratch
    for loss in ctx.task.losses:
        s = loss.suffix
        for who, g, t in (("T", loss.g_T, loss.test_T), ("S", loss.g_S, loss.test_S)):
            cols[f"gen_{who}{s}"], cols[f"gen_{who}{s}_se"] = masked_mean_se(g, ctx.ok, ctx.usable)
            cols[f"test_loss_{who}{s}"], cols[f"test_loss_{who}{s}_se"] = masked_mean_se(
                t, ctx.ok, ctx.usable)
        E = len(ctx.usable)
        if loss.g_0 is None:
            for name in (f"gen_S_scratch{s}", f"test_loss_S_scratch{s}"):
                cols[name], cols[name + "_se"] = np.full(E, np.nan), np.full(E, np.nan)
        else:
            use0 = ok0.sum(1) >= MIN_PAIRS
            cols[f"gen_S_scratch{s}"], cols[f"gen_S_scratch{s}_se"] = masked_mean_se(loss.g_0, ok0, use0)
            cols[f"test_loss_S_scratch{s}"], cols[f"test_loss_S_scratch{s}_se"] = masked_mean_se(
                loss.test_0, ok0, use0)
    if pops.scratch is None:
        notes.append("gen_S_scratch, test_loss_S_scratch: not computed (estimators.scratch = false)")
    else:
        cols["diverged_scratch"] = pops.diverged_scratch.sum(1)
    return StageOutput(cols, notes=tuple(notes))


def predictive_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """Convexity bound of the pairs' predictions on the training inputs and the task's
    decomposition of it."""
    cols = {}
    cols["klpred_convexity"], cols["klpred_convexity_se"] = masked_mean_se(
        ctx.task.convexity, ctx.ok, ctx.usable)
    dec_cols, notes = ctx.task.decomposition(ctx)
    cols.update(dec_cols)
    return StageOutput(cols, notes=tuple(notes))


def divergence_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """Particle estimators of KL_D (gaussian_full, gaussian_diag, knn; + se) and the
    Girsanov path-space bound."""
    run, task = ctx.run, ctx.task
    res: Resolved = run.resolved
    pops = run.populations
    E = len(ctx.usable)
    cols, notes = {}, []
    cols["kl_girsanov"], cols["kl_girsanov_se"] = np.full(E, np.nan), np.full(E, np.nan)
    if pops.girsanov is not None:
        cols["kl_girsanov"], cols["kl_girsanov_se"] = masked_mean_se(pops.girsanov, ctx.ok, ctx.usable)
    else:
        notes.append(f"kl_girsanov: NaN, {res.girsanov_reason}")
    names = ("gaussian_full", "gaussian_diag", "knn")
    if task.theta_S is None:
        value, why = task.param_kl
        for name in names:
            cols[f"kl_{name}"], cols[f"kl_{name}_se"] = np.full(E, value), np.full(E, np.nan)
        notes.append(f"kl_gaussian_full, kl_gaussian_diag, kl_knn: {why}")
        return StageOutput(cols, notes=tuple(notes))
    keep = ctx.ok & ctx.usable[:, None]
    S, T = task.theta_S, task.theta_T
    for name, est in (("gaussian_full", divergence.gaussian_full_batch(S, T, keep)),
                      ("gaussian_diag", divergence.gaussian_diag_batch(S, T, keep)),
                      ("knn", divergence.knn_batch(S, T, keep, k=run.config.estimators.knn_k))):
        cols[f"kl_{name}"] = np.where(ctx.usable, est.value, np.nan)
        cols[f"kl_{name}_se"] = np.where(ctx.usable, est.se, np.nan)
        if est.reason and ctx.usable.any():
            notes.append(f"kl_{name}: NaN, {est.reason}")
    notes.append(task.knn_note)
    return StageOutput(cols, notes=tuple(notes))


class Ball(NamedTuple):
    """The teacher's ball of B3 (per dataset) and the points S_D is maximised over."""

    centres: Any             # pytree, leaves (E, ...): mean of the surviving fit particles
    points: Any              # pytree, leaves (E, Q, ...): surviving fit particles for S_D
    rho: np.ndarray          # (E,) radius: quantile of the fit particles' distances
    outside: np.ndarray      # (E,) held-out teacher mass outside the ball
    p_dim: int


def teacher_ball(ctx: Context) -> Ball:
    """Centre, radius and held-out mass of the teacher's ball, all datasets at once."""
    est = ctx.run.config.estimators
    theta, ok, n_fit = ctx.task.theta_T, ctx.ok, ctx.n_fit
    E, P, p = theta.shape
    fit_ok, hold_ok = ok[:, :n_fit], ok[:, n_fit:]
    counts = np.maximum(fit_ok.sum(1), 1)
    w = fit_ok / counts[:, None]
    fit = jax.tree_util.tree_map(lambda x: np.asarray(x[:, :n_fit], np.float64), ctx.task.teacher)
    centres = jax.tree_util.tree_map(lambda x: np.einsum("ep,ep...->e...", w, x), fit)
    flat_c = np.einsum("ep,epi->ei", w, theta[:, :n_fit])
    dist = np.linalg.norm(theta[:, :n_fit] - flat_c[:, None], axis=-1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN rows: set to NaN below
        rho = np.nanquantile(np.where(fit_ok, dist, np.nan), est.b3_quantile, axis=1)
    rho = np.where(fit_ok.any(1), rho, np.nan)
    hold_dist = np.linalg.norm(theta[:, n_fit:] - flat_c[:, None], axis=-1)
    n_hold = hold_ok.sum(1)
    outside = np.where(n_hold > 0, (hold_ok & (hold_dist > rho[:, None])).sum(1) / np.maximum(n_hold, 1),
                       np.nan)
    # S_D over the centre and the first `curvature_points` surviving fit particles
    # (cycled when fewer survive; all fit particles when none does)
    Q = max(1, min(est.curvature_points, n_fit))
    order = np.argsort(~fit_ok, axis=1, kind="stable")                # survivors first
    n_ok = fit_ok.sum(1)
    j = np.arange(Q)[None] % np.where(n_ok > 0, n_ok, n_fit)[:, None]
    idx = np.where(n_ok[:, None] > 0, np.take_along_axis(order, j, axis=1), j)
    points = jax.tree_util.tree_map(lambda x: np.take_along_axis(
        x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1), fit)
    return Ball(centres, points, rho, outside, p)


def start_vectors(seed: int, E: int, purpose: int, shapes: tuple[tuple[int, ...], ...], dtype,
                  rademacher: tuple[int, ...] = ()) -> list[jax.Array]:
    """Per-dataset random start vectors / probes from the ``estimators`` stream.

    Dataset e, purpose q, entry i draws from ``fold_in(fold_in(key_e, q), i)`` (one flat
    draw each); entries listed in ``rademacher`` are random signs, the others normal.
    Returns one ``(E,) + shapes[i]`` array per entry.
    """
    root = streams.root_key(seed)
    keys = jax.vmap(lambda e: jax.random.fold_in(streams.dataset_key(root, "estimators", e), purpose))(
        jnp.arange(E, dtype=jnp.uint32))
    out = []
    for i, shape in enumerate(shapes):
        draw = streams.rademacher if i in rademacher else streams.normal
        out.append(jax.vmap(lambda k: draw(jax.random.fold_in(k, i), shape, dtype))(keys))
    return out


def _sharpness_impl(centres, points, rho, data, shared, v_top, probes, v_gap, *, fns, num_iters: int):
    """Per dataset: training-loss sharpness at the centre, and G_D, S_D of the gap.

    Args:
      centres: pytree ``(E, ...)``; points: pytree ``(E, Q, ...)`` teacher particles;
      rho ``(E,)``; data: pytree ``(E, ...)``; shared: pytree for every dataset;
      v_top ``(E, 2, p)``, probes ``(E, S, p)``, v_gap ``(E, Q + 1, p)``: random starts.
    Returns:
      ``(top, trace, trace_se, G, S, sam)``, each ``(E,)``.
    """

    # few parameters: exact eigenvalues from the full Hessian (p batched HVPs) instead of
    # num_iters sequential power-iteration HVPs
    dense = v_top.shape[-1] <= sharpness.DENSE_MAX       # then v_top, v_gap are empty

    def one(c, pts, r, data_e, v_top, probes, v_gap):
        loss = lambda w: fns.loss(w, data_e, shared)
        gap = lambda w: fns.gap(w, data_e, shared)
        allpts = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), c, pts)
        if dense:
            top = sharpness.hessian_eigenvalues(loss, c)[-1]
            S = jax.vmap(lambda w: jnp.abs(sharpness.hessian_eigenvalues(gap, w)).max())(allpts).max()
        else:
            top = sharpness.top_eigenvalue(loss, c, num_iters=num_iters, v0=v_top)
            S = jax.lax.map(lambda wv: sharpness.largest_abs_eigenvalue(
                gap, wv[0], num_iters=num_iters, v0=wv[1]), (allpts, v_gap)).max()
        trace, trace_se = sharpness.hutchinson_trace(loss, c, probes=probes)
        G = sharpness.gradient_norm(gap, c)
        sam = sharpness.sam_sharpness(loss, c, r)
        return top, trace, trace_se, G, S, sam

    return jax.vmap(one)(centres, points, rho, data, v_top, probes, v_gap)


_sharpness = jax.jit(_sharpness_impl, static_argnames=("fns", "num_iters"))
# the linear task's program (small float64 HVPs, milliseconds to run) compiles faster
# with cheaper code generation; models' HVPs through networks keep XLA's full optimisation
_sharpness_small = jax.jit(_sharpness_impl, static_argnames=("fns", "num_iters"),
                           compiler_options=bounds.FAST_COMPILE)


def laplace_columns(ctx: Context) -> dict[str, np.ndarray]:
    """Laplace sharpness from the surviving teacher particles' covariance, every dataset
    with more survivors than parameters at once: ``H = (Cov^{-1} - I/s0^2) / gamma``."""
    theta, ok = ctx.task.theta_T, ctx.ok
    E, P, p = theta.shape
    top, trace = np.full(E, np.nan), np.full(E, np.nan)
    n = ok.sum(1)
    has = n > p
    if not has.any():
        return {"sharpness_laplace_top": top, "sharpness_laplace_trace": trace}
    nm = ctx.run.resolved.numeric.teacher
    th, w, nh = theta[has], ok[has], n[has].astype(np.float64)
    mean = np.einsum("ep,epi->ei", w, th) / nh[:, None]
    c = np.where(w[..., None], th - mean[:, None], 0.0)
    cov = np.einsum("epi,epj->eij", c, c) / (nh - 1)[:, None, None]
    # a singular particle covariance (non-finite Hessian) stays NaN
    H = per_dataset(lambda a: (np.linalg.inv(a) - np.eye(p) / nm.prior_scale**2) / nm.gamma, cov)
    fin = np.isfinite(H).all(axis=(1, 2))
    ev = np.full((len(H), p), np.nan)
    if fin.any():
        ev[fin] = np.linalg.eigvalsh(0.5 * (H[fin] + np.swapaxes(H[fin], -1, -2)))
    top[has], trace[has] = ev[:, -1], ev.sum(-1)
    return {"sharpness_laplace_top": top, "sharpness_laplace_trace": trace}


def sharpness_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """Teacher sharpness at the ball's centre (top eigenvalue, Hutchinson trace, SAM),
    the gap's G_D and S_D of B3, the ball, and the Laplace sharpness."""
    cfg = ctx.run.config
    prob = ctx.task.sharpness
    ball = teacher_ball(ctx)
    E = len(ctx.usable)
    Q = jax.tree_util.tree_leaves(ball.points)[0].shape[1]
    with jax.enable_x64(prob.dtype == jnp.float64):
        # power-iteration starts only where the Hessian is too big to build (an entry's
        # draws do not depend on the others': the probes are the same either way)
        it = 0 if ball.p_dim <= sharpness.DENSE_MAX else 1
        v_top, probes, v_gap = start_vectors(
            cfg.seed, E, 0, ((2 * it, ball.p_dim), (prob.num_probes, ball.p_dim), ((Q + 1) * it, ball.p_dim)),
            prob.dtype, rademacher=(1,))
        cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, prob.dtype), t)
        program = _sharpness_small if prob.small else _sharpness
        out = program(cast(ball.centres), cast(ball.points), cast(ball.rho), prob.data, prob.shared,
                         v_top, probes, v_gap, fns=prob.fns, num_iters=prob.num_iters)
        top, trace, trace_se, G, S, sam = (np.asarray(x, np.float64) for x in jax.device_get(out))
    cols = {"sharpness_top": top, "sharpness_trace": trace, "sharpness_trace_se": trace_se,
            "sharpness_sam": sam, **laplace_columns(ctx), "gap_gradient": G, "gap_curvature": S,
            "rho": ball.rho, "b3_outside_mass": ball.outside}
    notes = []
    if ctx.run.resolved.static.num_particles <= ctx.task.param_count:
        notes.append(f"sharpness_laplace_top, sharpness_laplace_trace: NaN, the particle covariance "
                     f"needs more particles ({ctx.run.resolved.static.num_particles}) than parameters "
                     f"({ctx.task.param_count})")
    return StageOutput(cols, notes=tuple(notes), artefacts={"ball": ball})


def kl_for_bounds(run, cols) -> tuple[np.ndarray, np.ndarray, str]:
    """The KL the parameter-space bounds use, its standard error, and why it is not finite."""
    res = run.resolved
    name = res.bound_divergence
    E = res.static.num_datasets
    if res.static.task == "linear_gaussian" and not res.static.full_student:
        return (np.full(E, np.inf), np.zeros(E),
                f"the rank-{res.static.rank} student's parameter-space KL is infinite (see kl_exact)")
    if name == "girsanov" and not res.girsanov:
        return (np.full(E, np.nan), np.zeros(E),
                f"no parameter-space KL: Girsanov does not apply ({res.girsanov_reason}); "
                "use the function-space bounds")
    if name in ("exact", "stationary"):
        return cols[f"kl_{name}"], np.zeros(E), ""
    return cols[f"kl_{name}"], cols[f"kl_{name}_se"], ""


def bound_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """B0--B3 per dataset and pooled, for every loss (parameter space)."""
    cfg, cols = ctx.run.config, so_far.columns
    kl, kl_se, reason = kl_for_bounds(ctx.run, cols)
    exact = so_far.artefacts.get("exact_cgfs")
    out_cols, pooled, notes = {}, [], []
    for loss in ctx.task.losses:
        s = loss.suffix
        closed = f"gen_S{s}_exact" in cols       # the truth: the closed form where it exists
        E = len(ctx.usable)
        inp = BoundInputs(
            gen_T=cols[f"gen_T{s}"], gen_T_se=cols[f"gen_T{s}_se"],
            truth=cols[f"gen_S{s}_exact"] if closed else cols[f"gen_S{s}"],
            truth_se=np.zeros(E) if closed else cols[f"gen_S{s}_se"],
            kl=kl, kl_se=kl_se, kl_reason=reason, g_T=loss.g_T, ok=ctx.ok, usable=ctx.usable,
            n_fit=ctx.n_fit, cgf_kind=ctx.task.cgf_kind, exact_cgfs=exact,
            sharp=None if loss.b3_reason else {"G": cols["gap_gradient"], "S": cols["gap_curvature"],
                                               "rho": cols["rho"], "outside": cols["b3_outside_mass"]},
            sharp_reason=loss.b3_reason, sigma_bounded=loss.sigma_bounded, c_lam=cfg.estimators.c_lam,
            ess_fraction=cfg.estimators.ess_fraction)
        c, p, n = bound_columns(inp, s, timer=ctx.timer)
        out_cols.update(c)
        pooled.append(p)
        notes += n
    return StageOutput(out_cols, tuple(pooled), tuple(notes))


def function_space_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """Function-space gaps, convexity bound and F-bounds (SPEC §4)."""
    g = ctx.task.ghost(ctx, so_far.artefacts["ball"])
    cols, pooled, notes = fs.columns(ctx.run, ctx.ok, ctx.usable, g.pred_T, g.pred_S, g.Y, g.ghost,
                                     truth_exact=g.truth_exact, klF_exact=g.klF_exact,
                                     b3=g.b3, timer=ctx.timer)
    return StageOutput(cols, (pooled,), tuple(notes))


def closed_form_columns(ctx: Context) -> tuple[dict, list[str]]:
    """The linear task's closed-form columns and notes (its closed-form stage)."""
    out = linear_closed_forms(ctx)
    return out.columns, list(out.notes)


def monte_carlo_columns(ctx: Context) -> tuple[dict, list[str]]:
    """Gaps, test losses, convexity bound and decomposition from the surviving pairs."""
    gaps = gap_stage(ctx, Produced({}, {}))
    pred = predictive_stage(ctx, Produced(gaps.columns, {}))
    return {**gaps.columns, **pred.columns}, list(gaps.notes + pred.notes)


def divergence_columns(ctx: Context) -> tuple[dict, list[str]]:
    """Particle estimators of KL_D and the Girsanov bound (the divergence stage)."""
    out = divergence_stage(ctx, Produced({}, {}))
    return out.columns, list(out.notes)


def proj_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """Rank-r linear students: the teacher projected on the student's subspace as the DV
    reference (``kl_proj``, ``gen_proj``, ``B0_proj_upper``; kdsim/evaluation_proj.py)."""
    out = proj_evaluation(ctx.run)
    if out is None:
        return StageOutput({})
    cols, rows, notes = out
    return StageOutput(cols, (rows,), tuple(notes))


def cmi_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """Supersample runs: the ``supersample`` / ``mask`` columns and the CMI rows
    (kdsim/evaluation_cmi.py)."""
    if not ctx.run.resolved.static.supersample:
        return StageOutput({})
    cols, rows, notes = cmi_evaluation(ctx.run)
    return StageOutput(cols, (rows,), tuple(notes))


def generic_stage(ctx: Context, so_far: Produced) -> StageOutput:
    """The trajectory columns and the generic rows (incoherence, Bayes-stability, KD
    split, Gibbs identity; kdsim/generic_tables.py) on the bounded loss's truth."""
    cols, rows, notes = generic_tables.generic_columns(ctx.run, so_far.columns)
    return StageOutput(cols, (rows,), tuple(notes))


STAGES: tuple[tuple[str, Callable[[Context, Produced], StageOutput]], ...] = (
    ("closed_forms", closed_form_stage),
    ("estimators", gap_stage),
    ("estimators", predictive_stage),
    ("estimators", divergence_stage),
    ("estimators", sharpness_stage),
    ("estimators", bound_stage),           # its maths and tables time themselves
    ("estimators", function_space_stage),
    ("bounds", proj_stage),
    ("estimators", cmi_stage),
    ("bounds", generic_stage),
)


# ---------------------------------------------------------------------------------------
# the linear task


@dataclasses.dataclass(frozen=True)
class _LinearFns:
    """Training loss and gap of ONE linear particle ``W`` ``(k, d)``: sufficient statistics."""

    def loss(self, w, data_e, shared):
        Cxx, Cyx, Cyy = data_e
        return lg.empirical_risk(w, Cxx, Cyx, Cyy)

    def gap(self, w, data_e, shared):
        Cxx, Cyx, Cyy = data_e
        return lg.gap(w, Cxx, Cyx, Cyy, *shared)


def linear_view(run) -> tuple[TaskView, LinearExtras]:
    """The linear task: exact population risks, closed forms, an exact CGF."""
    res: Resolved = run.resolved
    st, nm, data, pops = res.static, res.numeric, run.data, run.populations
    E, P = st.num_datasets, st.num_particles
    W_T = np.asarray(pops.teacher, np.float64)
    W_S = np.asarray(pops.student, np.float64)
    G = st.n * data.Cxx
    extras = LinearExtras(W_T, W_S, closed_form.finite_time(data, st, nm),
                          closed_form.stationary(data, st, nm), G)
    pop_risk = lambda W: lg.population_risk_np(W, data)
    g0 = t0 = None
    if pops.scratch is not None:
        g0, t0 = lg.gap_np(pops.scratch, data), pop_risk(pops.scratch)
    loss = Loss("", lg.gap_np(W_T, data), lg.gap_np(W_S, data), pop_risk(W_T), pop_risk(W_S), g0, t0,
                None, "")
    p_dim = st.k * st.d
    if p_dim > 4:
        knn_note = (
            f"kl_knn: the k-NN estimator is strongly biased in {p_dim} dimensions at "
            f"{st.num_particles} particles (measured: -1.2 for a true 2.7 in 18 dimensions "
            "with 3000 particles; benchmarks/results/knn_bias.md); compare it with kl_exact, "
            "never use it as a bound's divergence here.")
    else:
        knn_note = (
            "kl_knn: biased low when the student is broader than the teacher (alpha < 1): "
            "the tails converge slowly (measured 0.18 for a true 0.30 in 2 dimensions with "
            "3000 particles; benchmarks/results/knn_bias.md).")
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)
        prob = SharpnessProblem(_LinearFns(), (f64(data.Cxx), f64(data.Cyx), f64(data.Cyy)),
                                (f64(data.W_star), f64(data.sx), f64(data.noise)), jnp.float64,
                                num_iters=200, num_probes=128, small=True)
    view = TaskView(
        losses=(loss,), teacher=W_T, theta_T=W_T.reshape(E, P, p_dim),
        theta_S=W_S.reshape(E, P, p_dim) if st.full_student else None,
        param_kl=(np.inf, "+inf (rank-r student, as kl_exact)"),
        convexity=predictive.convexity_pairs(W_S, W_T, G, nm.channel_noise),
        decomposition=_linear_decomposition, sharpness=prob, ghost=_linear_ghost,
        closed_forms=linear_closed_forms, knn_note=knn_note, cgf_kind=res.cgf, param_count=p_dim)
    return view, extras


def _linear_decomposition(ctx: Context):
    st, data = ctx.run.resolved.static, ctx.run.data
    values, ses = predictive.decomposition_batch(ctx.W_S, ctx.W_T, ctx.G, data.Pi, st.rank,
                                                 ctx.ok & ctx.usable[:, None])
    cols = {}
    for n_ in closed_form.Decomposition._fields:
        cols[f"decomp_{n_}_mc"] = np.where(ctx.usable, getattr(values, n_), np.nan)
        cols[f"decomp_{n_}_mc_se"] = np.where(ctx.usable, getattr(ses, n_), np.nan)
    return cols, []


def linear_closed_forms(ctx: Context) -> StageOutput:
    """Finite-time and stationary closed forms (float64), the exact sharpness, risks of
    the scratch student, and the exact CGFs the bounds use."""
    res: Resolved = ctx.run.resolved
    st, nm, data = res.static, res.numeric, ctx.run.data
    ft, sta = ctx.finite_time, ctx.stationary
    cols, notes = {}, []
    cols["gen_T_exact"], cols["gen_S_exact"] = closed_form.expected_gaps(ft, data)
    cols["gen_T_stationary"], cols["gen_S_stationary"] = closed_form.expected_gaps(sta, data)
    cols["kl_exact"] = closed_form.kl_parameter(ft, st.full_student)
    cols["kl_stationary"] = closed_form.kl_parameter(sta, st.full_student)
    if not st.full_student:
        notes.append(
            f"kl_exact, kl_stationary: +inf because the rank-{st.rank} student (r < d = {st.d}) "
            "has a singular kernel; parameter-space bounds are vacuous, use the function-space ones.")
    nu_p = nm.channel_noise
    cols["klpred_exact"] = closed_form.kl_predictive(ft, ctx.G, st.n, nu_p)
    cols["klpred_stationary"] = closed_form.kl_predictive(sta, ctx.G, st.n, nu_p)
    dec = closed_form.decomposition(ft, ctx.G, data.Pi, st.rank)
    cols["klpred_convexity_exact"] = dec.total / (2.0 * nu_p**2)
    for name, value in dec._asdict().items():
        cols[f"decomp_{name}"] = value
    for name, value in cols.items():
        bad = np.flatnonzero(np.isnan(value))
        if bad.size:
            notes.append(f"{name}: NaN in datasets {bad.tolist()}: the closed form's covariances "
                         "are not finite or too ill-conditioned for its linear algebra")
    cols["test_loss_T_exact"] = closed_form.expected_risks(ft.M_T, ft.Sigma_T, data)[0]
    cols["test_loss_S_exact"] = closed_form.expected_risks(ft.M_S, ft.Sigma_S, data)[0]
    # the scratch student: the same student with alpha = 1 (and so no teacher channel)
    sc_laws = closed_form.finite_time(data, st, nm._replace(alpha=1.0, teacher_noise=0.0))
    cols["gen_S_scratch_exact"] = closed_form.expected_gaps(sc_laws, data)[1]
    cols["test_loss_S_scratch_exact"] = closed_form.expected_risks(sc_laws.M_S, sc_laws.Sigma_S, data)[0]
    cols["sharpness_top_exact"] = np.linalg.eigvalsh(data.Cxx)[:, -1]
    cols["sharpness_trace_exact"] = st.k * np.trace(data.Cxx, axis1=1, axis2=2)
    cols["gap_curvature_exact"] = np.abs(np.linalg.eigvalsh(np.diag(data.sx)[None] - data.Cxx)).max(-1)
    laws = sta if res.bound_divergence == "stationary" else ft
    kappa, A = cgf_mod.exact_terms(laws.M_T, laws.Sigma_T, data.Cxx, data.Cyx, data.W_star, data.sx)
    return StageOutput(cols, notes=tuple(notes),
                       artefacts={"exact_cgfs": cgf_mod.exact(kappa, A, st.k)})


def _linear_ghost(ctx: Context, ball: Ball) -> Ghost:
    """Ghost points of the linear task, both populations' predictions (batched BLAS) and
    the closed forms of the function-space gaps and convexity bound."""
    run = ctx.run
    st, data = run.resolved.static, run.data
    root = streams.root_key(run.config.seed)
    Xg, Yg = lg.sample_points(*fs.ghost_streams(root), np.arange(st.num_datasets),
                              run.resolved.ghost_points, data.W_star, data.sx, data.noise)
    ghost = fs.Ghost(Xg, Yg)
    # (E, 1, n, d) @ (E, P, d, k) -> (E, P, n, k): batched BLAS, not einsum's loops
    on = lambda X, W: np.matmul(np.asarray(X, np.float64)[:, None], np.swapaxes(W, -1, -2))
    predict_ = lambda W: fs.Predictions(on(data.X, W), on(Xg, W))
    with ctx.timer("closed_forms"):
        truth, klF = fs.linear_exact(ctx, ghost)
    return Ghost(ghost, predict_(ctx.W_T), predict_(ctx.W_S), data.Y, truth, klF)


# ---------------------------------------------------------------------------------------
# tasks with models: planted MLP regression / classification, pools


@partial(jax.jit, static_argnames=("apply", "classification"))
def particle_metrics(params, X, Y, X_test, Y_test, *, apply, classification):
    """Per particle: mean train / test loss (and 0-1), and predictions on the training inputs.

    Args:
      params: pytree, leaves ``(E, P, ...)``; X ``(E, n, d)``; X_test ``(E, m, d)``, or a
        pool task's :class:`kdsim.tasks.pool.Blocks` (shared by every dataset; then the
        test losses are the exact pool averages and ``Y_test`` is None).
    Returns:
      dict of ``(E, P)`` arrays and ``"F"``: ``(E, P, n, out)``.
    """
    pooled = isinstance(X_test, pool_task.Blocks)

    def per_dataset_(w_e, X_e, Y_e, Xt_e, Yt_e):
        def one(w):
            f = apply(w, X_e)
            out = {"train": losses.task_risk(f, Y_e, classification), "F": f}
            if classification:
                out["train_01"] = jnp.mean(jax.vmap(losses.zero_one)(f, Y_e))
            if pooled:
                out.update(pool_task.pool_risk(apply, w, Xt_e, classification))
                return out
            ft = apply(w, Xt_e)
            out["test"] = losses.task_risk(ft, Yt_e, classification)
            if classification:
                out["test_01"] = jnp.mean(jax.vmap(losses.zero_one)(ft, Yt_e))
            return out

        return jax.lax.map(one, w_e, batch_size=CHUNK)

    test_axis = None if pooled else 0
    return jax.vmap(per_dataset_, in_axes=(0, 0, 0, test_axis, test_axis))(params, X, Y, X_test, Y_test)


@partial(jax.jit, static_argnames=("apply",))
def predict(params, X, *, apply):
    """Predictions ``(E, P, n, out)`` of a population on per-dataset inputs ``(E, n, ...)``."""
    return jax.vmap(lambda w_e, X_e: jax.lax.map(lambda w: apply(w, X_e), w_e,
                                                 batch_size=CHUNK))(params, X)


@dataclasses.dataclass(frozen=True)
class _ModelFns:
    """Training loss and gap of ONE particle of a model: ``data_e = (X, Y, X_test, Y_test)``,
    or ``(X, Y)`` with the pool's blocks as ``shared`` (the exact pool risk)."""

    apply: Callable
    classification: bool
    pooled: bool

    def _risk(self, w, X, Y):
        return losses.task_risk(self.apply(w, X), Y, self.classification)

    def loss(self, w, data_e, shared):
        return self._risk(w, data_e[0], data_e[1])

    def gap(self, w, data_e, shared):
        if self.pooled:
            test = pool_task.pool_risk(self.apply, w, shared, self.classification)["test"]
        else:
            test = self._risk(w, data_e[2], data_e[3])
        return test - self._risk(w, data_e[0], data_e[1])


def _flat(tree) -> np.ndarray:
    """A population pytree (leaves ``(E, P, ...)``) as ``(E, P, p)`` float64, each row
    ordered as ``ravel_pytree`` orders one particle."""
    leaves = jax.tree_util.tree_leaves(tree)
    E, P = np.shape(leaves[0])[:2]
    return np.concatenate([np.asarray(x, np.float64).reshape(E, P, -1) for x in leaves], axis=2)


def model_view(run) -> TaskView:
    """Tasks with models: no closed form; the truth is Monte Carlo, the CGF empirical,
    the parameter-space KL the Girsanov bound (same structure) or NaN."""
    res: Resolved = run.resolved
    st, nm, cfg, data, pops = res.static, res.numeric, run.config, run.data, run.populations
    classification = st.classification
    teacher_model, student_model = run.models
    dtype = jnp.dtype(st.dtype)
    with jax.enable_x64(st.dtype == "float64"):
        X = jnp.asarray(data.X, dtype)
        Y = jnp.asarray(data.Y) if classification else jnp.asarray(data.Y, dtype)
        pooled = st.task == "pool"
        if pooled:      # the exact population risk: the whole pool, block by block
            Xt, Yt = pool_task.blocks(data.pool, dtype), None
        else:
            Xt = jnp.asarray(data.X_test, dtype)
            Yt = jnp.asarray(data.Y_test) if classification else jnp.asarray(data.Y_test, dtype)
        metric = lambda params, model: jax.tree_util.tree_map(
            lambda x: np.asarray(x, np.float64),
            jax.device_get(particle_metrics(jax.tree_util.tree_map(jnp.asarray, params), X, Y, Xt, Yt,
                                            apply=model.apply, classification=classification)))
        m_T = metric(pops.teacher, teacher_model)
        m_S = metric(pops.student, student_model)
        m_0 = metric(pops.scratch, student_model) if pops.scratch is not None else None
        prob = SharpnessProblem(_ModelFns(teacher_model.apply, classification, pooled),
                                (X, Y) if pooled else (X, Y, Xt, Yt), Xt if pooled else None, dtype,
                                num_iters=cfg.estimators.power_iterations,
                                num_probes=cfg.estimators.hutchinson_probes)
    names = [("", "train", "test", None, "")]
    if classification:
        names.append(("_01", "train_01", "test_01", 1.0,
                      "B3 is never computed from the 0-1 loss (zero gradient almost everywhere)"))
    loss_views = []
    for sfx, tr, te, sigma, b3_reason in names:
        gap = lambda m: m[te] - m[tr]
        loss_views.append(Loss(sfx, gap(m_T), gap(m_S), m_T[te], m_S[te],
                               None if m_0 is None else gap(m_0), None if m_0 is None else m_0[te],
                               sigma, b3_reason))
    same = same_structure(*run.models)
    theta_T = _flat(pops.teacher)
    if classification:
        tau = nm.temperature
        logq = jax.nn.log_softmax(m_S["F"] / tau, axis=-1)
        logp = jax.nn.log_softmax(m_T["F"] / tau, axis=-1)
        convexity = np.asarray(np.sum(np.exp(logq) * (logq - logp), axis=(-1, -2)), np.float64)
    else:
        D = m_S["F"] - m_T["F"]
        convexity = np.sum(D * D, axis=(-1, -2)) / (2 * nm.channel_noise**2)
    return TaskView(
        losses=tuple(loss_views), teacher=pops.teacher, theta_T=theta_T,
        theta_S=_flat(pops.student) if same else None,
        param_kl=(np.nan, "NaN, a parameter-space KL between different architectures is meaningless"),
        convexity=convexity,
        decomposition=partial(_model_decomposition, F_S=m_S["F"], F_T=m_T["F"]),
        sharpness=prob, ghost=partial(_model_ghost, F_T=m_T["F"], F_S=m_S["F"]), closed_forms=None,
        knn_note="kl_knn, kl_gaussian_diag: not upper bounds; in these dimensions the k-NN "
                 "estimate is far off (benchmarks/results/knn_bias.md)",
        cgf_kind="empirical", param_count=teacher_model.num_params)


def _model_decomposition(ctx: Context, F_S, F_T):
    """Bias / variance of the pairs' prediction differences (regression); rank and
    subspace are linear-task quantities. All datasets at once."""
    E = len(ctx.usable)
    cols = {n: np.full(E, np.nan) for n in (
        "decomp_bias_mc", "decomp_bias_mc_se", "decomp_variance_mc", "decomp_variance_mc_se",
        "decomp_subspace_mc", "decomp_rank_mc")}
    notes = ["decomp_subspace_mc, decomp_rank_mc: NaN, the subspace and rank terms belong "
             "to the linear task's rank-r students"]
    if ctx.run.resolved.static.classification:
        notes.append("decomp_*_mc: NaN, the decomposition is for the Gaussian channel "
                     "(regression); klpred_convexity uses the categorical channel at tau")
        return cols, notes
    ok = ctx.ok
    n = ok.sum(1).astype(np.float64)
    D = np.where(ok[..., None, None], F_S - F_T, 0.0)                 # (E, P, n, out)
    Dbar = D.sum(1) / np.maximum(n, 1)[:, None, None]
    dev = np.where(ok[..., None, None], D - Dbar[:, None], 0.0)
    var = np.sum(dev**2, axis=(-1, -2))                               # (E, P)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = var.sum(1) / (n - 1)
        cross = np.sum(dev * Dbar[:, None], axis=(-1, -2))
        sd = lambda x: np.sqrt(np.sum(np.where(ok, (x - (x * ok).sum(1, keepdims=True) / n[:, None]) ** 2,
                                               0.0), 1) / (n - 1))
        u = ctx.usable
        # unbiased ||E D||^2: ||mean||^2 minus the variance of the mean
        cols["decomp_bias_mc"] = np.where(u, np.sum(Dbar**2, axis=(-1, -2)) - variance / n, np.nan)
        cols["decomp_variance_mc"] = np.where(u, variance, np.nan)
        cols["decomp_variance_mc_se"] = np.where(u, sd(var) / np.sqrt(n), np.nan)
        cols["decomp_bias_mc_se"] = np.where(u, 2 * sd(cross) / np.sqrt(n), np.nan)
    return cols, notes


def _model_ghost(ctx: Context, ball: Ball, F_T, F_S) -> Ghost:
    res: Resolved = ctx.run.resolved
    run = ctx.run
    st, nm, cfg, data, pops = res.static, res.numeric, run.config, run.data, run.populations
    classification = st.classification
    teacher_model, student_model = run.models
    out = st.num_classes if classification else st.k
    root = streams.root_key(cfg.seed)
    gx, gy = fs.ghost_streams(root)
    if st.task == "pool":          # fresh i.i.d. draws from mu = uniform on the pool
        Xg, Yg, _ = pool_task.ghost_points(gx, np.arange(st.num_datasets), data.pool, res.ghost_points)
    else:
        Xg, Yg = mlp_task._sample(gx, gy, jnp.arange(st.num_datasets, dtype=jnp.uint32),
                                  jnp.asarray(data.A), jnp.asarray(data.B), jnp.float32(nm.planted_scale),
                                  jnp.float32(nm.noise), n=res.ghost_points, out=out,
                                  classification=classification)
    ghost = fs.Ghost(np.asarray(Xg), np.asarray(Yg))
    dtype = jnp.dtype(st.dtype)
    with jax.enable_x64(st.dtype == "float64"):
        Xg_d = jnp.asarray(ghost.X, dtype)
        to64 = lambda a: np.asarray(a, np.float64)
        on_ghost = lambda params, model: to64(predict(jax.tree_util.tree_map(jnp.asarray, params), Xg_d,
                                                      apply=model.apply))
        pred_T = fs.Predictions(F_T, on_ghost(pops.teacher, teacher_model))
        pred_S = fs.Predictions(F_S, on_ghost(pops.student, student_model))
        b3 = None
        if classification:
            Q = jax.tree_util.tree_leaves(ball.points)[0].shape[1]
            (v,) = start_vectors(cfg.seed, st.num_datasets, 1, ((Q + 1, ball.p_dim),), dtype)
            cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)
            G, S = fs._label_gap_curvature(
                cast(ball.centres), cast(ball.points), jnp.asarray(data.X, dtype), jnp.asarray(data.Y),
                Xg_d, jnp.asarray(ghost.Y), jnp.asarray(nm.temperature, dtype), v,
                apply=teacher_model.apply, num_iters=cfg.estimators.power_iterations)
            b3 = {"G": to64(G), "S": to64(S), "rho": ball.rho, "outside": ball.outside}
    Y = data.Y if classification else np.asarray(data.Y, np.float64)
    return Ghost(ghost, pred_T, pred_S, Y, None, None, b3)
