"""From trained populations to the per-dataset columns of API.md (linear task).

Closed forms (float64 NumPy), particle estimators (divergences, CGF, sharpness) and
the bounds, with a note for every column that is NaN or infinite and why.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import closed_form, streams
from .config import Resolved
from . import function_space as fs
from .bound_tables import MIN_PAIRS, BoundInputs, Evaluation, _split, bound_columns, finish
from .timing import StageTimer, single_threaded_blas, timer_or_null
from .estimators import cgf as cgf_mod
from .estimators import divergence, predictive, sharpness
from .stats import mean_se
from .tasks import linear_gaussian as lg

# ---------------------------------------------------------------------------------------
# sharpness of the teacher (JAX autodiff, float64)


@partial(jax.jit, static_argnames=("num_iters", "num_probes"))
def _linear_sharpness(keys, centres, fit, rho, Cxx, Cyx, Cyy, W_star, sx, noise, *,
                      num_iters: int = 200, num_probes: int = 128):
    """Per dataset: loss sharpness at the centre and the gap's G_D, S_D (vmapped over E).

    Args:
      keys: ``(E,)`` estimator keys; centres: ``(E, k, d)``; fit: ``(E, Q, k, d)`` teacher
        particles where S_D is also evaluated (diverged ones replaced by the centre);
        rho: ``(E,)`` SAM radius.
    """
    n_pts = fit.shape[1] + 1
    p_dim = centres.shape[-1] * centres.shape[-2]
    dtype = centres.dtype
    # every random start and probe drawn over one flat axis (fast to compile), per dataset
    sub = jax.vmap(lambda k: jax.random.split(k, 3))(keys)                 # (E, 3)
    v_top = jax.vmap(lambda k: streams.normal(k, (2, p_dim), dtype))(sub[:, 0])
    probes = jax.vmap(lambda k: streams.rademacher(k, (num_probes, p_dim), dtype))(sub[:, 1])
    v_gap = jax.vmap(lambda k: streams.normal(k, (n_pts, p_dim), dtype))(sub[:, 2])

    def one(c, particles, r, Cxx, Cyx, Cyy, v_top, probes, v_gap):
        loss = lambda w: lg.empirical_risk(w, Cxx, Cyx, Cyy)
        gap = lambda w: lg.gap(w, Cxx, Cyx, Cyy, W_star, sx, noise)
        top = sharpness.top_eigenvalue(loss, c, num_iters=num_iters, v0=v_top)
        trace, trace_se = sharpness.hutchinson_trace(loss, c, probes=probes)
        G = sharpness.gradient_norm(gap, c)
        points = jnp.concatenate([c[None], particles])           # the centre and the particles
        S = jax.vmap(lambda w, v: sharpness.largest_abs_eigenvalue(gap, w, num_iters=num_iters,
                                                                   v0=v))(points, v_gap).max()
        sam = sharpness.sam_sharpness(loss, c, r)
        return top, trace, trace_se, G, S, sam

    return jax.vmap(one)(centres, fit, rho, Cxx, Cyx, Cyy, v_top, probes, v_gap)


# ---------------------------------------------------------------------------------------


class Context(NamedTuple):
    """What every evaluation stage of one run shares."""

    run: object               # simulate.LinearRun
    ok: np.ndarray            # (E, P) pairs with neither member diverged
    usable: np.ndarray        # (E,) datasets with enough surviving pairs
    W_T: np.ndarray           # (E, P, k, d) float64
    W_S: np.ndarray           # (E, P, k, d) float64
    g_T: np.ndarray           # (E, P) gaps of the teacher particles
    g_S: np.ndarray           # (E, P)
    finite_time: closed_form.GaussianLaws
    stationary: closed_form.GaussianLaws
    G: np.ndarray             # (E, d, d) Gram of the evaluation (= training) inputs


def context(run) -> tuple[Context, dict[str, np.ndarray], list[str]]:
    """Shared arrays, the divergence counts and their notes."""
    st, nm = run.resolved.static, run.resolved.numeric
    pops, data = run.populations, run.data
    notes = []
    cols = {"dataset": np.arange(st.num_datasets),
            "diverged_T": pops.diverged_T.sum(axis=1), "diverged_S": pops.diverged_S.sum(axis=1)}
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
    W_T = pops.teacher.astype(np.float64)
    W_S = pops.student
    ctx = Context(run, ok, usable, W_T, W_S, lg.gap_np(W_T, data), lg.gap_np(W_S, data),
                  closed_form.finite_time(data, st, nm), closed_form.stationary(data, st, nm),
                  st.n * data.Cxx)
    return ctx, cols, notes


def closed_form_columns(ctx: Context) -> tuple[dict[str, np.ndarray], list[str]]:
    """Finite-time and stationary closed forms (float64)."""
    st, nm = ctx.run.resolved.static, ctx.run.resolved.numeric
    data, ft, sta = ctx.run.data, ctx.finite_time, ctx.stationary
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
    return cols, notes


def monte_carlo_columns(ctx: Context) -> tuple[dict[str, np.ndarray], list[str]]:
    """Gaps, convexity bound and decomposition from the surviving pairs."""
    st, nm, data = ctx.run.resolved.static, ctx.run.resolved.numeric, ctx.run.data
    names = ["gen_T", "gen_T_se", "gen_S", "gen_S_se", "klpred_convexity", "klpred_convexity_se"]
    for n_ in closed_form.Decomposition._fields:
        names += [f"decomp_{n_}_mc", f"decomp_{n_}_mc_se"]
    cols = {name: np.full(st.num_datasets, np.nan) for name in names}
    for e in np.flatnonzero(ctx.usable):
        keep = ctx.ok[e]
        cols["gen_T"][e], cols["gen_T_se"][e] = mean_se(ctx.g_T[e, keep])
        cols["gen_S"][e], cols["gen_S_se"][e] = mean_se(ctx.g_S[e, keep])
        W_S, W_T = ctx.W_S[e, keep], ctx.W_T[e, keep]
        conv = predictive.convexity_bound(W_S, W_T, ctx.G[e], nm.channel_noise)
        cols["klpred_convexity"][e], cols["klpred_convexity_se"][e] = conv
        values, ses = predictive.decomposition(W_S, W_T, ctx.G[e], data.Pi[e], st.rank)
        for n_ in closed_form.Decomposition._fields:
            cols[f"decomp_{n_}_mc"][e] = getattr(values, n_)
            cols[f"decomp_{n_}_mc_se"][e] = getattr(ses, n_)
    return cols, []


def divergence_columns(ctx: Context) -> tuple[dict[str, np.ndarray], list[str]]:
    """Particle estimators of KL_D: gaussian_full, gaussian_diag, knn (+ se)."""
    st, cfg = ctx.run.resolved.static, ctx.run.config
    E, p_dim = st.num_datasets, st.k * st.d
    estimators = (("gaussian_full", divergence.gaussian_full),
                  ("gaussian_diag", divergence.gaussian_diag),
                  ("knn", partial(divergence.knn, k=cfg.estimators.knn_k)))
    cols = {}
    for name, _ in estimators:
        cols[f"kl_{name}"] = np.full(E, np.inf if not st.full_student else np.nan)
        cols[f"kl_{name}_se"] = np.full(E, np.nan)
    notes: list[str] = []
    if not st.full_student:
        notes.append("kl_gaussian_full, kl_gaussian_diag, kl_knn: +inf (rank-r student, as kl_exact)")
        return cols, notes
    why_nan: dict[str, str] = {}
    for e in np.flatnonzero(ctx.usable):
        keep = ctx.ok[e]
        s_flat = ctx.W_S[e, keep].reshape(-1, p_dim)
        t_flat = ctx.W_T[e, keep].reshape(-1, p_dim)
        for name, fn in estimators:
            try:
                cols[f"kl_{name}"][e], cols[f"kl_{name}_se"][e] = fn(s_flat, t_flat)
            except divergence.NotApplicable as err:
                why_nan[f"kl_{name}"] = str(err)
    notes += [f"{name}: NaN, {why}" for name, why in why_nan.items()]
    if p_dim > 4:
        notes.append(
            f"kl_knn: the k-NN estimator is strongly biased in {p_dim} dimensions at "
            f"{st.num_particles} particles (measured: -1.2 for a true 2.7 in 18 dimensions "
            "with 3000 particles; benchmarks/results/knn_bias.md); compare it with kl_exact, "
            "never use it as a bound's divergence here.")
    else:
        notes.append(
            "kl_knn: biased low when the student is broader than the teacher (alpha < 1): "
            "the tails converge slowly (measured 0.18 for a true 0.30 in 2 dimensions with "
            "3000 particles; benchmarks/results/knn_bias.md).")
    return cols, notes


def engine_columns(ctx: Context) -> tuple[dict[str, np.ndarray], list[str]]:
    """Girsanov path-space KL, and KD versus the same student trained from scratch."""
    run = ctx.run
    res: Resolved = run.resolved
    st, nm, data, pops = res.static, res.numeric, run.data, run.populations
    E = st.num_datasets
    notes: list[str] = []
    cols = {name: np.full(E, np.nan) for name in (
        "kl_girsanov", "kl_girsanov_se", "test_loss_T", "test_loss_T_se", "test_loss_S",
        "test_loss_S_se", "gen_S_scratch", "gen_S_scratch_se", "test_loss_S_scratch",
        "test_loss_S_scratch_se")}
    pop_risk = lambda W: lg.population_risk_np(W, data)
    risk_T, risk_S = pop_risk(ctx.W_T), pop_risk(ctx.W_S)
    for e in np.flatnonzero(ctx.usable):
        keep = ctx.ok[e]
        cols["test_loss_T"][e], cols["test_loss_T_se"][e] = mean_se(risk_T[e, keep])
        cols["test_loss_S"][e], cols["test_loss_S_se"][e] = mean_se(risk_S[e, keep])
        if pops.girsanov is not None:
            cols["kl_girsanov"][e], cols["kl_girsanov_se"][e] = mean_se(pops.girsanov[e, keep])
    if pops.girsanov is None:
        notes.append(f"kl_girsanov: NaN, {res.girsanov_reason}")
    ft = ctx.finite_time
    cols["test_loss_T_exact"] = closed_form.expected_risks(ft.M_T, ft.Sigma_T, data)[0]
    cols["test_loss_S_exact"] = closed_form.expected_risks(ft.M_S, ft.Sigma_S, data)[0]
    # the scratch student: the same student with alpha = 1 (and so no teacher channel)
    scratch_nm = nm._replace(alpha=1.0, teacher_noise=0.0)
    sc_laws = closed_form.finite_time(data, st, scratch_nm)
    cols["gen_S_scratch_exact"] = closed_form.expected_gaps(sc_laws, data)[1]
    cols["test_loss_S_scratch_exact"] = closed_form.expected_risks(sc_laws.M_S, sc_laws.Sigma_S, data)[0]
    if pops.scratch is None:
        notes.append("gen_S_scratch, test_loss_S_scratch: not computed (estimators.scratch = false)")
        return cols, notes
    cols["diverged_scratch"] = pops.diverged_scratch.sum(1)
    ok0 = ctx.ok & ~pops.diverged_scratch
    g0, risk0 = lg.gap_np(pops.scratch, data), pop_risk(pops.scratch)
    for e in np.flatnonzero(ok0.sum(1) >= MIN_PAIRS):
        cols["gen_S_scratch"][e], cols["gen_S_scratch_se"][e] = mean_se(g0[e, ok0[e]])
        cols["test_loss_S_scratch"][e], cols["test_loss_S_scratch_se"][e] = mean_se(risk0[e, ok0[e]])
    return cols, notes


def linear_columns(run, timer: StageTimer | None = None) -> Evaluation:
    """Per-dataset columns of the linear task, the pooled bounds, and the notes.

    ``timer`` (optional) collects the seconds of each stage: ``closed_forms``,
    ``estimators``, ``bounds`` (the bound maths) and ``tables`` (columns and notes).
    """
    with single_threaded_blas():
        return _linear_columns(run, timer_or_null(timer))


def _linear_columns(run, timer: StageTimer) -> Evaluation:
    with timer("closed_forms"):
        ctx, cols, notes = context(run)
    stages = (("closed_forms", closed_form_columns), ("estimators", monte_carlo_columns),
              ("estimators", divergence_columns), ("estimators", engine_columns))
    for name, stage in stages:
        with timer(name):
            c, n_ = stage(ctx)
        cols.update(c)
        notes += n_
    with timer("estimators"):
        cols.update(_sharpness_columns(run, ctx.ok))
    with timer("closed_forms"):
        inputs = _linear_bound_inputs(run, ctx, cols)
    bound_cols, pooled, bnotes = bound_columns(inputs, timer=timer)
    cols.update(bound_cols)
    notes += bnotes
    with timer("estimators"):
        fs_cols, fs_pooled, fs_notes = function_space_columns(ctx, timer)
    cols.update(fs_cols)
    notes += fs_notes
    with timer("tables"):
        return finish(cols, pd.concat([pooled, fs_pooled]), notes)


def function_space_columns(ctx: Context, timer: StageTimer | None = None):
    """Function-space gaps, convexity bound and F-bounds of the linear task (Gaussian
    channel), with the closed forms of the gaps and of the convexity bound."""
    run = ctx.run
    st, data = run.resolved.static, run.data
    root = streams.root_key(run.config.seed)
    Xg, Yg = lg.sample_points(*fs.ghost_streams(root), np.arange(st.num_datasets),
                              run.resolved.ghost_points, data.W_star, data.sx, data.noise)
    ghost = fs.Ghost(Xg, Yg)
    # (E, 1, n, d) @ (E, P, d, k) -> (E, P, n, k): batched BLAS, not einsum's loops
    on = lambda X, W: np.matmul(np.asarray(X, np.float64)[:, None], np.swapaxes(W, -1, -2))
    predict = lambda W: fs.Predictions(on(data.X, W), on(Xg, W))
    with timer_or_null(timer)("closed_forms"):
        truth, klF = fs.linear_exact(ctx, ghost)
    return fs.columns(run, ctx.ok, ctx.usable, predict(ctx.W_T), predict(ctx.W_S), data.Y, ghost,
                      truth_exact=truth, klF_exact=klF, timer=timer)


def _sharpness_columns(run, ok: np.ndarray) -> dict[str, np.ndarray]:
    res: Resolved = run.resolved
    st, cfg, data = res.static, run.config, run.data
    E, P = st.num_datasets, st.num_particles
    W_T = run.populations.teacher.astype(np.float64)
    n_fit = _split(P, cfg.estimators.b3_holdout)
    fit_ok = ok[:, :n_fit]
    counts = np.maximum(fit_ok.sum(axis=1), 1)
    centres = np.einsum("ep,epkd->ekd", fit_ok, W_T[:, :n_fit]) / counts[:, None, None]
    # diverged fit particles are replaced by the centre: neutral for every maximum below
    fit = np.where(fit_ok[..., None, None], W_T[:, :n_fit], centres[:, None])
    dist = np.linalg.norm((fit - centres[:, None]).reshape(E, n_fit, -1), axis=-1)
    q = cfg.estimators.b3_quantile
    rho = np.array([np.quantile(dist[e][fit_ok[e]], q) if fit_ok[e].any() else np.nan
                    for e in range(E)])
    hold_ok = ok[:, n_fit:]
    hold_dist = np.linalg.norm((W_T[:, n_fit:] - centres[:, None]).reshape(E, P - n_fit, -1), axis=-1)
    outside = np.array([np.mean(hold_dist[e][hold_ok[e]] > rho[e]) if hold_ok[e].any() else np.nan
                        for e in range(E)])
    root = streams.root_key(cfg.seed)
    keys = jax.vmap(lambda e: streams.dataset_key(root, "estimators", e))(
        jnp.arange(E, dtype=jnp.uint32))
    # S_D is maximised over the centre and the first `curvature_points` fit particles
    # (as for the MLP tasks): the cost stays independent of the population size
    Q = max(1, min(cfg.estimators.curvature_points, n_fit))
    with jax.enable_x64(True):
        out = _linear_sharpness(keys, centres, fit[:, :Q], rho, data.Cxx, data.Cyx, data.Cyy,
                                data.W_star, data.sx, data.noise)
        top, trace, trace_se, G_D, S_D, sam = (np.asarray(x, np.float64) for x in out)
    cols = {
        "sharpness_top": top, "sharpness_top_exact": np.linalg.eigvalsh(data.Cxx)[:, -1],
        "sharpness_trace": trace, "sharpness_trace_se": trace_se,
        "sharpness_trace_exact": st.k * np.trace(data.Cxx, axis1=1, axis2=2),
        "sharpness_sam": sam,
        "gap_gradient": G_D, "gap_curvature": S_D,
        "gap_curvature_exact": np.abs(np.linalg.eigvalsh(np.diag(data.sx)[None] - data.Cxx)).max(-1),
        "rho": rho, "b3_outside_mass": outside,
    }
    lap_top, lap_trace = np.full(E, np.nan), np.full(E, np.nan)
    p_dim = st.k * st.d
    gamma, s0 = res.numeric.teacher.gamma, res.numeric.teacher.prior_scale
    # datasets whose pairs all survived: one vmapped call; the others one by one
    intact = ok.all(axis=1) & (P > p_dim)
    H = np.full((E, p_dim, p_dim), np.nan)
    if intact.any():
        with jax.enable_x64(True):
            H[intact] = np.asarray(_laplace_batch(jnp.asarray(W_T[intact].reshape(-1, P, p_dim)),
                                                  gamma, s0))
    for e in np.flatnonzero(~intact):
        parts = W_T[e, ok[e]].reshape(-1, p_dim)
        if parts.shape[0] > p_dim:
            with jax.enable_x64(True):
                H[e] = np.asarray(sharpness.laplace_hessian(jnp.asarray(parts), gamma, s0))
    # a singular particle covariance (non-finite Hessian) stays NaN
    has = np.isfinite(H).all(axis=(1, 2))
    if has.any():
        ev = np.linalg.eigvalsh(0.5 * (H[has] + np.swapaxes(H[has], -1, -2)))
        lap_top[has], lap_trace[has] = ev[:, -1], ev.sum(-1)
    cols["sharpness_laplace_top"] = lap_top
    cols["sharpness_laplace_trace"] = lap_trace
    return cols


@jax.jit
def _laplace_batch(parts, gamma, prior_scale):
    """:func:`sharpness.laplace_hessian` of every dataset: ``(E, P, p) -> (E, p, p)``."""
    return jax.vmap(lambda w: sharpness.laplace_hessian(w, gamma, prior_scale))(parts)


def _kl_for_bounds(run, cols) -> tuple[np.ndarray, np.ndarray, str]:
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


def _linear_bound_inputs(run, ctx: "Context", cols) -> BoundInputs:
    res: Resolved = run.resolved
    st, cfg, data = res.static, run.config, run.data
    laws = ctx.stationary if res.bound_divergence == "stationary" else ctx.finite_time
    kappa, A = cgf_mod.exact_terms(laws.M_T, laws.Sigma_T, data.Cxx, data.Cyx, data.W_star, data.sx)
    kl, kl_se, reason = _kl_for_bounds(run, cols)
    E = st.num_datasets
    return BoundInputs(
        gen_T=cols["gen_T"], gen_T_se=cols["gen_T_se"], truth=cols["gen_S_exact"],
        truth_se=np.zeros(E), kl=kl, kl_se=kl_se, kl_reason=reason, g_T=ctx.g_T, ok=ctx.ok,
        usable=ctx.usable, n_fit=_split(st.num_particles, cfg.estimators.b3_holdout),
        cgf_kind=res.cgf, exact_cgfs=cgf_mod.exact(kappa, A, st.k),
        sharp={"G": cols["gap_gradient"], "S": cols["gap_curvature"], "rho": cols["rho"],
               "outside": cols["b3_outside_mass"]},
        sharp_reason="", sigma_bounded=None, c_lam=cfg.estimators.c_lam,
        ess_fraction=cfg.estimators.ess_fraction)
