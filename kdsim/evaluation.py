"""From trained populations to the per-dataset columns of API.md (linear task).

Closed forms (float64 NumPy), particle estimators (divergences, CGF, sharpness) and
the bounds, with a note for every column that is NaN or infinite and why.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import bounds, closed_form, streams
from .config import Resolved
from .estimators import cgf as cgf_mod
from .estimators import divergence, predictive, sharpness
from .stats import mean_se
from .tasks import linear_gaussian as lg

BOUND_NAMES = ("B0_upper", "B0_lower", "B1_upper", "B2_lower", "B3_upper")
UPPER = {"B0_upper": True, "B0_lower": False, "B1_upper": True, "B2_lower": False, "B3_upper": True}


class Evaluation(NamedTuple):
    per_dataset: pd.DataFrame
    pooled: pd.DataFrame
    notes: list[str]


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


MIN_PAIRS = 4


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


def linear_columns(run) -> Evaluation:
    """Per-dataset columns of the linear task, the pooled bounds, and the notes."""
    ctx, cols, notes = context(run)
    for stage in (closed_form_columns, monte_carlo_columns, divergence_columns, engine_columns):
        c, n_ = stage(ctx)
        cols.update(c)
        notes += n_
    cols.update(_sharpness_columns(run, ctx.ok))
    bound_cols, pooled, bnotes = bound_columns(_linear_bound_inputs(run, ctx, cols))
    cols.update(bound_cols)
    notes += bnotes
    fs_cols, fs_pooled, fs_notes = function_space_columns(ctx)
    cols.update(fs_cols)
    notes += fs_notes
    return finish(cols, pd.concat([pooled, fs_pooled]), notes)


def function_space_columns(ctx: Context):
    """Function-space gaps, convexity bound and F-bounds of the linear task (Gaussian
    channel), with the closed forms of the gaps and of the convexity bound."""
    from . import function_space as fs
    run = ctx.run
    st, data = run.resolved.static, run.data
    root = streams.root_key(run.config.seed)
    Xg, Yg = lg.sample_points(*fs.ghost_streams(root), np.arange(st.num_datasets),
                              run.resolved.ghost_points, data.W_star, data.sx, data.noise)
    ghost = fs.Ghost(Xg, Yg)
    predict = lambda W: fs.Predictions(np.einsum("epkd,end->epnk", W, data.X),
                                       np.einsum("epkd,emd->epmk", W, Xg))
    truth, klF = fs.linear_exact(ctx, ghost)
    return fs.columns(run, ctx.ok, ctx.usable, predict(ctx.W_T), predict(ctx.W_S), data.Y, ghost,
                      truth_exact=truth, klF_exact=klF)


def finish(cols: dict, pooled: pd.DataFrame, notes: list[str]) -> Evaluation:
    """Columns to a DataFrame (flags as nullable booleans)."""
    df = pd.DataFrame(cols)
    for col in df.columns:
        if col.removesuffix("_01").endswith(("_valid", "_assumption")):
            df[col] = as_flags(df[col].to_numpy())
    return Evaluation(df, pooled, notes)


def as_flags(values: np.ndarray) -> pd.arrays.BooleanArray:
    """1/0/NaN -> True/False/<NA> (a flag that does not apply is missing, not False)."""
    values = np.asarray(values, np.float64)
    return pd.array([pd.NA if np.isnan(v) else bool(v) for v in values], dtype="boolean")


def _split(P: int, holdout: float) -> int:
    """Number of teacher particles that define the fit (centre, radius, CGF fit)."""
    return max(2, min(P - 1, P - int(round(holdout * P))))


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
    for e in range(E):
        parts = W_T[e, ok[e]].reshape(-1, p_dim)
        if parts.shape[0] > p_dim:
            with jax.enable_x64(True):
                H = np.asarray(sharpness.laplace_hessian(jnp.asarray(parts), gamma, s0))
            if not np.isfinite(H).all():   # a singular particle covariance: stays NaN
                continue
            ev = np.linalg.eigvalsh(0.5 * (H + H.T))
            lap_top[e], lap_trace[e] = ev[-1], ev.sum()
    cols["sharpness_laplace_top"] = lap_top
    cols["sharpness_laplace_trace"] = lap_trace
    return cols


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


def b1_lam_max(cgf, c_lam: float) -> float:
    """B1's lambda range: ``c_lam / kappa_max`` for an exact CGF (sub-exponential upper
    tail; inf when it is sub-Gaussian everywhere), the empirical CGF's usable range else."""
    if cgf.kind == "exact":
        return c_lam / cgf.kappa_max if cgf.kappa_max > 0 else math.inf
    return cgf.lam_sup


class BoundInputs(NamedTuple):
    """What the bounds of one loss need, per dataset (leading axis E)."""

    gen_T: np.ndarray
    gen_T_se: np.ndarray
    truth: np.ndarray           # the student's true gap: closed form, else Monte Carlo
    truth_se: np.ndarray        # 0 for a closed form
    kl: np.ndarray
    kl_se: np.ndarray
    kl_reason: str              # why KL is not finite ("" if it is)
    g_T: np.ndarray             # (E, P) teacher-particle gaps (empirical CGF)
    ok: np.ndarray              # (E, P) surviving pairs
    usable: np.ndarray          # (E,)
    n_fit: int                  # the first n_fit teacher particles fit; the rest check
    cgf_kind: str               # "exact" | "empirical"
    exact_cgfs: list | None     # per-dataset exact CGFs (linear task), else None
    sharp: dict | None          # {"G", "S", "rho", "outside"} arrays, or None
    sharp_reason: str           # why B3 is NaN when sharp is None
    sigma_bounded: float | None  # sigma = B of a loss bounded in [0, B] (B1 then needs no fit)
    c_lam: float
    ess_fraction: float


def bound_columns(inp: BoundInputs, suffix: str = "", prefix: str = ""):
    """Bounds B0--B3 per dataset, their flags, and the pooled bounds.

    Returns ``(columns, pooled DataFrame, notes)``; column names carry ``prefix``
    (``"F_"`` for the function-space bounds) and ``suffix`` (``"_01"`` for the 0-1 loss).
    ``inp.sharp`` may carry ``"extra_var"``: a variance proxy added to ``sigma_D(rho)^2``
    (the label draws of the function-space B3).
    """
    E = len(inp.gen_T)
    notes: list[str] = []
    sfx = lambda name: prefix + name + suffix
    out = {sfx(name): np.full(E, np.nan) for name in (
        "sigma_B1", "lam_max", "B0_lam", "B0_eta", "B2_eta", "B2_eps", "rho0", *BOUND_NAMES)}
    if inp.exact_cgfs is not None:
        out[sfx("kappa_min")] = np.array([c.kappa_min for c in inp.exact_cgfs])
        out[sfx("kappa_max")] = np.array([c.kappa_max for c in inp.exact_cgfs])
    flags = {sfx(f"{b}_{s}"): np.full(E, np.nan) for b in BOUND_NAMES for s in ("valid", "assumption")}
    cgfs_fit, used = [], []
    for e in range(E):
        kl_raw = float(inp.kl[e])
        if not inp.usable[e] or np.isnan(kl_raw):
            continue
        fit_ok = inp.ok[e, :inp.n_fit]
        hold_ok = inp.ok[e, inp.n_fit:]
        if inp.cgf_kind == "exact":
            fit_cgf = inp.exact_cgfs[e]
        else:
            fit_cgf = cgf_mod.empirical(inp.g_T[e, :inp.n_fit][fit_ok], inp.ess_fraction)
        # assumptions are judged on data independent of the fit: the exact Lambda, else
        # the held-out teacher particles
        if inp.exact_cgfs is not None:
            check = inp.exact_cgfs[e]
        elif hold_ok.sum() >= MIN_PAIRS:
            check = cgf_mod.empirical(inp.g_T[e, inp.n_fit:][hold_ok], inp.ess_fraction)
        else:
            check = None
        cgfs_fit.append(fit_cgf)
        used.append(e)
        gT, gT_se = float(inp.gen_T[e]), float(inp.gen_T_se[e])
        kl_e = max(kl_raw, 0.0)          # KL >= 0: a negative estimate is noise around 0
        kl_se_e = float(inp.kl_se[e]) if np.isfinite(inp.kl_se[e]) else 0.0

        # B1: sigma from the bounded loss, or fitted (exact / empirical CGF)
        if inp.sigma_bounded is not None:
            lam_max, sigma2 = math.inf, inp.sigma_bounded**2
            b1, lam_b1 = bounds.subgaussian_excess(kl_e, sigma2, lam_max)
            b1_holds = True                      # Hoeffding: a bounded loss is sub-Gaussian
        else:
            lam_max = b1_lam_max(fit_cgf, inp.c_lam)
            b1, lam_b1, sigma2 = bounds.subgaussian_bound(kl_e, fit_cgf, lam_max)
            b1_holds = None if check is None else bounds.subgaussian_holds(check, sigma2, lam_max)
        out[sfx("sigma_B1")][e], out[sfx("lam_max")][e] = math.sqrt(sigma2), lam_max
        # B3
        if inp.sharp is not None:
            G_D, S_D, rho = (float(inp.sharp[n][e]) for n in ("G", "S", "rho"))
            sig3 = math.sqrt(bounds.sharpness_sigma(G_D, S_D, rho) ** 2
                             + float(inp.sharp.get("extra_var", np.zeros(E))[e]))
            b3, lam_b3 = bounds.subgaussian_excess(kl_e, sig3**2, math.inf)
            out[sfx("rho0")][e] = bounds.tightness_radius(G_D, S_D, math.sqrt(sigma2))
            b3_holds = bool(inp.sharp["outside"][e] == 0)
        else:
            b3, lam_b3, b3_holds = math.nan, math.nan, None
        # B2
        central = bounds.central_excess(kl_e, fit_cgf)
        out[sfx("B2_eta")][e], out[sfx("B2_eps")][e] = central.eta, central.eps
        # B0 (candidates: the lam of B1 and B3, B2's grid)
        b0u, lam0 = bounds.dv_excess(kl_e, fit_cgf, +1, candidates=(lam_b1, lam_b3))
        b0l, eta0 = bounds.dv_excess(kl_e, fit_cgf, -1, candidates=fit_cgf.grid(-1))
        out[sfx("B0_lam")][e], out[sfx("B0_eta")][e] = lam0, eta0

        excess = {"B0_upper": b0u, "B0_lower": b0l, "B1_upper": b1, "B2_lower": central.excess,
                  "B3_upper": b3}
        # Monte Carlo error of a bound: gen_T's, plus the estimated KL's (finite difference)
        d_excess = {}
        if kl_se_e > 0 and math.isfinite(kl_e):
            kl2 = kl_e + kl_se_e
            d_excess = {
                "B0_upper": bounds.dv_excess(kl2, fit_cgf, +1, (lam_b1, lam_b3))[0] - b0u,
                "B0_lower": bounds.dv_excess(kl2, fit_cgf, -1, fit_cgf.grid(-1))[0] - b0l,
                "B1_upper": bounds.subgaussian_excess(kl2, sigma2, lam_max)[0] - b1,
                "B2_lower": bounds.central_excess(kl2, fit_cgf).excess - central.excess}
            if inp.sharp is not None:
                d_excess["B3_upper"] = bounds.subgaussian_excess(kl2, sig3**2, math.inf)[0] - b3
        assumption = {
            "B0_upper": True, "B0_lower": True, "B1_upper": b1_holds,
            "B2_lower": None if check is None else bounds.central_holds(check, central.eta, central.eps),
            "B3_upper": b3_holds,
        }
        truth, truth_se = float(inp.truth[e]), float(inp.truth_se[e])
        for name in BOUND_NAMES:
            if math.isnan(excess[name]):
                continue
            sign = 1.0 if UPPER[name] else -1.0
            value = gT + sign * excess[name]
            out[sfx(name)][e] = value
            se = math.sqrt(gT_se**2 + d_excess.get(name, 0.0) ** 2 + truth_se**2)
            flags[sfx(f"{name}_valid")][e] = bounds.holds(value, truth, se, UPPER[name])
            if assumption[name] is not None:
                flags[sfx(f"{name}_assumption")][e] = assumption[name]

    for name in BOUND_NAMES:
        sign = 1.0 if UPPER[name] else -1.0
        out[sfx(f"{name}_tightness")] = sign * (out[sfx(name)] - inp.truth)
    out.update(flags)
    if inp.kl_reason:
        what = "+inf / -inf" if np.isinf(inp.kl).any() else "NaN"
        notes.append(f"{', '.join(sfx(b) for b in BOUND_NAMES)}: {what}: {inp.kl_reason}.")
    elif inp.sharp is None:
        notes.append(f"{sfx('B3_upper')}: NaN: {inp.sharp_reason}.")
    if inp.exact_cgfs is not None:
        if np.nanmax(out[sfx("kappa_max")]) > 0 and inp.sigma_bounded is None:
            notes.append(
                "kappa_max > 0: the upper tail of the teacher's gap is sub-exponential, NOT "
                "sub-Gaussian for all lam; B1 uses lam_max = c_lam / kappa_max "
                f"(c_lam = {inp.c_lam}).")
        if np.nanmin(out[sfx("kappa_min")]) < 0:
            notes.append(
                "kappa_min < 0: Lambda_D(-eta) = +inf for eta >= 1/|kappa_min|; the B2 grid and "
                "B0's lower search stop there.")
    for name in ("B1_upper", "B2_lower", "B3_upper"):
        failed = np.flatnonzero(flags[sfx(f"{name}_assumption")] == 0)
        if failed.size:
            why = " (held-out teacher mass outside the B3 ball > 0)" if name == "B3_upper" else ""
            notes.append(f"{sfx(name + '_assumption')}: False in datasets {failed.tolist()}{why}")
    for name in BOUND_NAMES:
        broken = np.flatnonzero(flags[sfx(f"{name}_valid")] == 0)
        if broken.size:
            notes.append(f"{sfx(name + '_valid')}: False in datasets {broken.tolist()} (the bound "
                         "fails on the truth beyond 3 standard errors)")
    pooled = _pooled_bounds(inp, cgfs_fit, np.asarray(used, int), suffix, prefix)
    return out, pooled, notes


def _pooled_bounds(inp: BoundInputs, cgfs: list, idx: np.ndarray, suffix: str,
                   prefix: str = "") -> pd.DataFrame:
    """Bounds on the dataset-averaged gap with K_n = E_D KL_D and E_D Lambda_D (one lam)."""
    columns = ["value", "truth", "tightness", "valid"]
    if not cgfs:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="bound"), dtype=float)
    cg = bounds.pooled(cgfs)
    K_n = float(np.mean(np.maximum(inp.kl[idx], 0.0)))
    gT = float(np.mean(inp.gen_T[idx]))
    se = float(np.sqrt(np.sum(inp.gen_T_se[idx] ** 2 + inp.truth_se[idx] ** 2)) / len(idx))
    truth = float(np.mean(inp.truth[idx]))
    if inp.sigma_bounded is not None:
        lam_max = math.inf
        b1, lam_b1 = bounds.subgaussian_excess(K_n, inp.sigma_bounded**2, lam_max)
    else:
        lam_max = b1_lam_max(cg, inp.c_lam)
        b1, lam_b1, _ = bounds.subgaussian_bound(K_n, cg, lam_max)
    b0u, _ = bounds.dv_excess(K_n, cg, +1, candidates=(lam_b1,))
    b0l, _ = bounds.dv_excess(K_n, cg, -1, candidates=cg.grid(-1))
    b2 = bounds.central_excess(K_n, cg).excess
    rows = {}
    for name, value, upper in (("B0_upper", gT + b0u, True), ("B0_lower", gT - b0l, False),
                               ("B1_upper", gT + b1, True), ("B2_lower", gT - b2, False)):
        tight = value - truth if upper else truth - value
        rows[prefix + name + suffix] = (value, truth, tight, float(bounds.holds(value, truth, se, upper)))
    df = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    df.index.name = "bound"
    return df


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
        cgf_kind=res.cgf, exact_cgfs=[cgf_mod.exact(kappa[e], A[e], st.k) for e in range(E)],
        sharp={"G": cols["gap_gradient"], "S": cols["gap_curvature"], "rho": cols["rho"],
               "outside": cols["b3_outside_mass"]},
        sharp_reason="", sigma_bounded=None, c_lam=cfg.estimators.c_lam,
        ess_fraction=cfg.estimators.ess_fraction)
