"""From trained MLP populations to the per-dataset columns of API.md.

There is no closed form: the truth is Monte Carlo (``gen_S`` within its standard
error), the CGF is empirical (fitted on the first teacher particles, its assumptions
judged on the held-out ones), and the parameter-space KL is the Girsanov path-space
bound when the student lives in the teacher's parameter space (else the
parameter-space bounds are NaN with the reason: use the function-space ones).
Classification reports every gap and bound for the cross-entropy (unsuffixed) and for
the 0-1 loss (suffix ``_01``; B1 with the bounded-loss sigma = 1, never B3).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.flatten_util import ravel_pytree

from . import bound_tables as bt
from . import evaluation as ev
from . import function_space as fs
from . import losses, streams
from .config import Resolved
from .estimators import divergence, sharpness
from .models import same_structure
from .stats import mean_se
from .tasks import mlp as mlp_task
from .timing import single_threaded_blas, timer_or_null
from .tasks import pool as pool_task

CHUNK = 8   # particles evaluated at once per dataset (bounds memory on large test sets)


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

    def per_dataset(w_e, X_e, Y_e, Xt_e, Yt_e):
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
    return jax.vmap(per_dataset, in_axes=(0, 0, 0, test_axis, test_axis))(params, X, Y, X_test, Y_test)


@partial(jax.jit, static_argnames=("apply",))
def predict(params, X, *, apply):
    """Predictions ``(E, P, n, out)`` of a population on per-dataset inputs ``(E, n, ...)``."""
    return jax.vmap(lambda w_e, X_e: jax.lax.map(lambda w: apply(w, X_e), w_e,
                                                 batch_size=CHUNK))(params, X)


@partial(jax.jit, static_argnames=("apply", "classification", "num_iters"))
def _mlp_sharpness(centres, points, rho, X, Y, X_test, Y_test, v_top, probes, v_gap, *, apply,
                   classification, num_iters: int):
    """Per dataset: training-loss sharpness at the centre, and G_D, S_D of the gap.

    Args:
      centres: pytree ``(E, ...)``; points: pytree ``(E, Q, ...)`` teacher particles;
      v_top ``(E, 2, p)``, probes ``(E, S, p)``, v_gap ``(E, Q + 1, p)``: random starts.
      X_test may be a pool's :class:`kdsim.tasks.pool.Blocks` (as for :func:`particle_metrics`).
    """
    risk = lambda w, X, Y: losses.task_risk(apply(w, X), Y, classification)
    pooled = isinstance(X_test, pool_task.Blocks)
    test_risk = ((lambda w, Xt, Yt: pool_task.pool_risk(apply, w, Xt, classification)["test"])
                 if pooled else risk)

    def one(c, pts, r, X_e, Y_e, Xt_e, Yt_e, v_top, probes, v_gap):
        loss = lambda w: risk(w, X_e, Y_e)
        gap = lambda w: test_risk(w, Xt_e, Yt_e) - risk(w, X_e, Y_e)
        top = sharpness.top_eigenvalue(loss, c, num_iters=num_iters, v0=v_top)
        trace, trace_se = sharpness.hutchinson_trace(loss, c, probes=probes)
        G = sharpness.gradient_norm(gap, c)
        allpts = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), c, pts)
        S = jax.lax.map(lambda wv: sharpness.largest_abs_eigenvalue(gap, wv[0], num_iters=num_iters,
                                                                    v0=wv[1]),
                        (allpts, v_gap)).max()
        sam = sharpness.sam_sharpness(loss, c, r)
        return top, trace, trace_se, G, S, sam

    t = None if pooled else 0
    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, t, t, 0, 0, 0))(
        centres, points, rho, X, Y, X_test, Y_test, v_top, probes, v_gap)


def _take(tree, e: int, idx=None) -> np.ndarray:
    """Dataset e of a population pytree (optionally particles ``idx``) as ``(P', p)`` float64,
    each row ordered as ``ravel_pytree`` orders one particle."""
    rows = [np.asarray(x[e]) for x in jax.tree_util.tree_leaves(tree)]
    if idx is not None:
        rows = [r[idx] for r in rows]
    return np.concatenate([r.reshape(r.shape[0], -1) for r in rows], axis=1).astype(np.float64)


def mlp_columns(run, timer=None) -> bt.Evaluation:
    """Per-dataset columns, pooled bounds and notes of an MLP run; ``timer`` (optional)
    collects the seconds of the bound maths (``bounds``), their tables (``tables``) and
    everything else (``estimators``)."""
    timer = timer_or_null(timer)
    with single_threaded_blas(), timer("estimators"):
        return _mlp_columns(run, timer)


def _mlp_columns(run, timer) -> bt.Evaluation:
    res: Resolved = run.resolved
    st, nm, cfg, data, pops = res.static, res.numeric, run.config, run.data, run.populations
    classification = st.classification
    E, P = st.num_datasets, st.num_particles
    teacher_model, student_model = run.models
    dtype = jnp.dtype(st.dtype)
    notes: list[str] = []
    cols: dict[str, np.ndarray] = {"dataset": np.arange(E),
                                   "diverged_T": pops.diverged_T.sum(1),
                                   "diverged_S": pops.diverged_S.sum(1)}
    ok = ~pops.diverged_T & ~pops.diverged_S
    if (~ok).any():
        notes.append(
            f"DIVERGED: {int(pops.diverged_T.sum())} teacher and {int(pops.diverged_S.sum())} "
            f"student particles blew up in datasets {np.flatnonzero((~ok).any(1)).tolist()}; "
            "their pairs are excluded from every estimate. Reduce the step size.")
    usable = ok.sum(1) >= bt.MIN_PAIRS

    with jax.enable_x64(st.dtype == "float64"):
        X = jnp.asarray(data.X, dtype)
        Y = jnp.asarray(data.Y) if classification else jnp.asarray(data.Y, dtype)
        if st.task == "pool":      # the exact population risk: the whole pool, block by block
            Xt, Yt = pool_task.blocks(data.pool, dtype), None
        else:
            Xt = jnp.asarray(data.X_test, dtype)
            Yt = jnp.asarray(data.Y_test) if classification else jnp.asarray(data.Y_test, dtype)
        metric = lambda params, model: jax.tree_util.tree_map(
            lambda x: np.asarray(x, np.float64),
            particle_metrics(jax.tree_util.tree_map(jnp.asarray, params), X, Y, Xt, Yt,
                             apply=model.apply, classification=classification))
        m_T = metric(pops.teacher, teacher_model)
        m_S = metric(pops.student, student_model)
        m_0 = metric(pops.scratch, student_model) if pops.scratch is not None else None

    losses = [("", "train", "test")] + ([("_01", "train_01", "test_01")] if classification else [])
    for sfx, tr, te in losses:
        for who, m in (("T", m_T), ("S", m_S)):
            gap = m[te] - m[tr]
            cols[f"gen_{who}{sfx}"], cols[f"gen_{who}{sfx}_se"] = _per_dataset(gap, ok, usable)
            cols[f"test_loss_{who}{sfx}"], cols[f"test_loss_{who}{sfx}_se"] = _per_dataset(m[te], ok, usable)
        if m_0 is None:
            for name in (f"gen_S_scratch{sfx}", f"test_loss_S_scratch{sfx}"):
                cols[name], cols[name + "_se"] = np.full(E, np.nan), np.full(E, np.nan)
        else:
            ok0 = ok & ~pops.diverged_scratch
            cols[f"gen_S_scratch{sfx}"], cols[f"gen_S_scratch{sfx}_se"] = _per_dataset(
                m_0[te] - m_0[tr], ok0, ok0.sum(1) >= bt.MIN_PAIRS)
            cols[f"test_loss_S_scratch{sfx}"], cols[f"test_loss_S_scratch{sfx}_se"] = _per_dataset(
                m_0[te], ok0, ok0.sum(1) >= bt.MIN_PAIRS)
    if m_0 is None:
        notes.append("gen_S_scratch, test_loss_S_scratch: not computed (estimators.scratch = false)")
    else:
        cols["diverged_scratch"] = pops.diverged_scratch.sum(1)

    # ---- divergences between the pairs
    cols.update(_predictive_columns(m_S["F"], m_T["F"], ok, usable, nm, classification, notes))
    cols.update(_kl_columns(run, ok, usable, notes))

    # ---- teacher sharpness and the B3 ball (task loss: squared / cross-entropy)
    n_fit = bt._split(P, cfg.estimators.b3_holdout)
    sharp_cols, ball = _sharpness_columns(run, ok, n_fit, X, Y, Xt, Yt, teacher_model, classification)
    cols.update(sharp_cols)

    # ---- bounds: task loss (unsuffixed), 0-1 loss (_01)
    kl, kl_se, reason = ev._kl_for_bounds(run, cols)
    pooled_all = []
    for sfx, tr, te in losses:
        g_T = m_T[te] - m_T[tr]
        is01 = sfx == "_01"
        inp = bt.BoundInputs(
            gen_T=cols[f"gen_T{sfx}"], gen_T_se=cols[f"gen_T{sfx}_se"], truth=cols[f"gen_S{sfx}"],
            truth_se=cols[f"gen_S{sfx}_se"], kl=kl, kl_se=kl_se, kl_reason=reason, g_T=g_T, ok=ok,
            usable=usable, n_fit=n_fit, cgf_kind="empirical", exact_cgfs=None,
            sharp=None if is01 else {"G": cols["gap_gradient"], "S": cols["gap_curvature"],
                                     "rho": cols["rho"], "outside": cols["b3_outside_mass"]},
            sharp_reason="B3 is never computed from the 0-1 loss (zero gradient almost everywhere)",
            sigma_bounded=1.0 if is01 else None, c_lam=cfg.estimators.c_lam,
            ess_fraction=cfg.estimators.ess_fraction)
        bcols, pooled, bnotes = bt.bound_columns(inp, sfx, timer=timer)
        cols.update(bcols)
        notes += bnotes
        pooled_all.append(pooled)
    lap = laplace_note(run)
    if lap:
        notes.append(lap)
    fs_cols, fs_pooled, fs_notes = _function_space(run, ok, usable, m_T["F"], m_S["F"], ball,
                                                   teacher_model, student_model, timer)
    cols.update(fs_cols)
    notes += fs_notes
    return bt.finish(cols, pd.concat(pooled_all + [fs_pooled]), notes)


def _function_space(run, ok, usable, F_T, F_S, ball: "Ball", teacher_model, student_model,
                    timer=None):
    res: Resolved = run.resolved
    st, nm, cfg, data, pops = res.static, res.numeric, run.config, run.data, run.populations
    classification = st.classification
    out = st.num_classes if classification else st.k
    root = streams.root_key(cfg.seed)
    gx, gy = fs.ghost_streams(root)
    if st.task == "pool":          # fresh i.i.d. draws from mu = uniform on the pool
        Xg, Yg, _ = pool_task.ghost_points(gx, np.arange(st.num_datasets), data.pool,
                                           res.ghost_points)
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
        pred_T = fs.Predictions(F_T, to64(predict(jax.tree_util.tree_map(jnp.asarray, pops.teacher),
                                                  Xg_d, apply=teacher_model.apply)))
        pred_S = fs.Predictions(F_S, to64(predict(jax.tree_util.tree_map(jnp.asarray, pops.student),
                                                  Xg_d, apply=student_model.apply)))
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
    return fs.columns(run, ok, usable, pred_T, pred_S, np.asarray(data.Y, np.float64)
                      if not classification else data.Y, ghost, b3=b3, timer=timer)


def _per_dataset(values: np.ndarray, ok: np.ndarray, usable: np.ndarray):
    """Mean and se over the surviving particles of each dataset, ``(E,)`` each."""
    E = values.shape[0]
    mean, se = np.full(E, np.nan), np.full(E, np.nan)
    for e in np.flatnonzero(usable):
        mean[e], se[e] = mean_se(values[e, ok[e]])
    return mean, se


def _predictive_columns(F_S, F_T, ok, usable, nm, classification, notes):
    """Convexity bound on the pairs' predictions on the training inputs, and (regression)
    its bias / variance decomposition; rank and subspace are linear-task quantities."""
    E = F_S.shape[0]
    cols = {n: np.full(E, np.nan) for n in (
        "klpred_convexity", "klpred_convexity_se", "decomp_bias_mc", "decomp_bias_mc_se",
        "decomp_variance_mc", "decomp_variance_mc_se", "decomp_subspace_mc", "decomp_rank_mc")}
    for e in np.flatnonzero(usable):
        S, T = F_S[e, ok[e]], F_T[e, ok[e]]                           # (P', n, out)
        if classification:
            tau = nm.temperature
            logq = jax.nn.log_softmax(jnp.asarray(S / tau), axis=-1)
            logp = jax.nn.log_softmax(jnp.asarray(T / tau), axis=-1)
            per_pair = np.asarray(jnp.sum(jnp.exp(logq) * (logq - logp), axis=(-1, -2)), np.float64)
        else:
            D = S - T
            per_pair = np.sum(D * D, axis=(-1, -2)) / (2 * nm.channel_noise**2)
            P_ = D.shape[0]
            Dbar = D.mean(0)
            var = np.sum((D - Dbar) ** 2, axis=(-1, -2))
            variance = var.sum() / (P_ - 1)
            # unbiased ||E D||^2: ||mean||^2 minus the variance of the mean
            cols["decomp_bias_mc"][e] = np.sum(Dbar**2) - variance / P_
            cols["decomp_variance_mc"][e] = variance
            cols["decomp_variance_mc_se"][e] = var.std(ddof=1) / np.sqrt(P_)
            cross = np.sum((D - Dbar) * Dbar, axis=(-1, -2))
            cols["decomp_bias_mc_se"][e] = 2 * cross.std(ddof=1) / np.sqrt(P_)
        cols["klpred_convexity"][e], cols["klpred_convexity_se"][e] = mean_se(per_pair)
    notes.append("decomp_subspace_mc, decomp_rank_mc: NaN, the subspace and rank terms belong "
                 "to the linear task's rank-r students")
    if classification:
        notes.append("decomp_*_mc: NaN, the decomposition is for the Gaussian channel "
                     "(regression); klpred_convexity uses the categorical channel at tau")
    return cols


def _kl_columns(run, ok, usable, notes):
    """Girsanov path-space bound, and the moment / k-NN estimators for same-architecture pairs."""
    res: Resolved = run.resolved
    st, pops = res.static, run.populations
    E = st.num_datasets
    cols = {f"kl_{n}{s}": np.full(E, np.nan) for n in ("girsanov", "gaussian_full", "gaussian_diag",
                                                        "knn") for s in ("", "_se")}
    if pops.girsanov is not None:
        cols["kl_girsanov"], cols["kl_girsanov_se"] = _per_dataset(pops.girsanov, ok, usable)
    else:
        notes.append(f"kl_girsanov: NaN, {res.girsanov_reason}")
    if not same_structure(*run.models):
        notes.append("kl_gaussian_full, kl_gaussian_diag, kl_knn: NaN, a parameter-space KL "
                     "between different architectures is meaningless")
        return cols
    why = {}
    for e in np.flatnonzero(usable):
        s, t = _take(pops.student, e, ok[e]), _take(pops.teacher, e, ok[e])
        for name, fn in (("gaussian_full", divergence.gaussian_full),
                         ("gaussian_diag", divergence.gaussian_diag),
                         ("knn", partial(divergence.knn, k=run.config.estimators.knn_k))):
            try:
                cols[f"kl_{name}"][e], cols[f"kl_{name}_se"][e] = fn(s, t)
            except divergence.NotApplicable as err:
                why[name] = str(err)
    notes += [f"kl_{n}: NaN, {w}" for n, w in why.items()]
    notes.append("kl_knn, kl_gaussian_diag: not upper bounds; in these dimensions the k-NN "
                 "estimate is far off (benchmarks/results/knn_bias.md)")
    return cols


class Ball(NamedTuple):
    """The teacher's ball of B3 (per dataset) and the points S_D is maximised over."""

    centres: object          # pytree, leaves (E, ...): mean of the surviving fit particles
    points: object           # pytree, leaves (E, Q, ...): fit particles for S_D
    rho: np.ndarray          # (E,) radius: quantile of the fit particles' distances
    outside: np.ndarray      # (E,) held-out teacher mass outside the ball
    p_dim: int


def teacher_ball(run, ok: np.ndarray, n_fit: int) -> Ball:
    res: Resolved = run.resolved
    st, est, pops = res.static, run.config.estimators, run.populations
    E = st.num_datasets
    fit_ok = ok[:, :n_fit]
    counts = np.maximum(fit_ok.sum(1), 1)
    fit = jax.tree_util.tree_map(lambda x: np.asarray(x[:, :n_fit], np.float64), pops.teacher)
    centres = jax.tree_util.tree_map(
        lambda x: np.einsum("ep,ep...->e...", fit_ok, x) / counts.reshape((E,) + (1,) * (x.ndim - 2)), fit)
    flat_fit = np.stack([_take(fit, e) for e in range(E)])                 # (E, n_fit, p)
    flat_c = np.stack([ravel_pytree(jax.tree_util.tree_map(lambda x: x[e], centres))[0]
                       for e in range(E)])
    dist = np.linalg.norm(flat_fit - flat_c[:, None], axis=-1)
    rho = np.array([np.quantile(dist[e][fit_ok[e]], est.b3_quantile) if fit_ok[e].any() else np.nan
                    for e in range(E)])
    hold = np.stack([_take(pops.teacher, e, np.arange(n_fit, st.num_particles)) for e in range(E)])
    hold_ok = ok[:, n_fit:]
    hold_dist = np.linalg.norm(hold - flat_c[:, None], axis=-1)
    outside = np.array([np.mean(hold_dist[e][hold_ok[e]] > rho[e]) if hold_ok[e].any() else np.nan
                        for e in range(E)])
    # S_D over the centre and the first `curvature_points` surviving fit particles
    Q = max(1, min(est.curvature_points, n_fit))
    idx = np.stack([np.resize(np.flatnonzero(fit_ok[e]) if fit_ok[e].any() else np.arange(n_fit), Q)
                    for e in range(E)])
    points = jax.tree_util.tree_map(lambda x: np.take_along_axis(
        x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1), fit)
    return Ball(centres, points, rho, outside, flat_c.shape[1])


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


def _sharpness_columns(run, ok, n_fit, X, Y, Xt, Yt, model, classification):
    res: Resolved = run.resolved
    st, cfg, pops = res.static, run.config, run.populations
    E = st.num_datasets
    est = cfg.estimators
    ball = teacher_ball(run, ok, n_fit)
    centres, points, rho, outside, p_dim = ball.centres, ball.points, ball.rho, ball.outside, ball.p_dim
    Q = jax.tree_util.tree_leaves(points)[0].shape[1]
    # in the engine's precision: HVPs through the n_test test points dominate the cost
    dtype = jnp.dtype(st.dtype)
    with jax.enable_x64(st.dtype == "float64"):
        v_top, probes, v_gap = start_vectors(
            cfg.seed, E, 0, ((2, p_dim), (est.hutchinson_probes, p_dim), (Q + 1, p_dim)), dtype,
            rademacher=(1,))
        cast = lambda a: jnp.asarray(a, dtype)
        out = _mlp_sharpness(
            jax.tree_util.tree_map(cast, centres), jax.tree_util.tree_map(cast, points), cast(rho),
            X, Y, Xt, Yt, v_top, probes, v_gap, apply=model.apply, classification=classification,
            num_iters=est.power_iterations)
        top, trace, trace_se, G, S, sam = (np.asarray(x, np.float64) for x in out)
    lap_top, lap_trace = np.full(E, np.nan), np.full(E, np.nan)
    gamma, s0 = res.numeric.teacher.gamma, res.numeric.teacher.prior_scale
    for e in range(E):
        parts = _take(pops.teacher, e, ok[e])
        if parts.shape[0] > p_dim:
            with jax.enable_x64(True):
                H = np.asarray(sharpness.laplace_hessian(jnp.asarray(parts), gamma, s0))
            if not np.isfinite(H).all():   # a singular particle covariance: stays NaN
                continue
            evs = np.linalg.eigvalsh(0.5 * (H + H.T))
            lap_top[e], lap_trace[e] = evs[-1], evs.sum()
    return {"sharpness_top": top, "sharpness_trace": trace, "sharpness_trace_se": trace_se,
            "sharpness_sam": sam, "sharpness_laplace_top": lap_top,
            "sharpness_laplace_trace": lap_trace, "gap_gradient": G, "gap_curvature": S,
            "rho": rho, "b3_outside_mass": outside}, ball


def laplace_note(run) -> str:
    res = run.resolved
    p = run.models[0].num_params
    if res.static.num_particles <= p:
        return (f"sharpness_laplace_top, sharpness_laplace_trace: NaN, the particle covariance "
                f"needs more particles ({res.static.num_particles}) than parameters ({p})")
    return ""
