"""Function-space bounds (SPEC §4, last items): bounds that hold for any student.

The hypothesis is the NOISY prediction on an evaluation set made of the training inputs
plus ``m'`` ghost points (fresh ``(x', y')`` per dataset, stream ``ghost``):

- regression, Gaussian channel: ``F = f_w(x) + nu_p z``, loss ``0.5 ||y - F||^2``;
- classification, categorical channel: a label drawn from ``softmax(f_w(x) / tau)``,
  loss ``1[label != y]``.

Its gap ``g_F = mean ghost loss - mean train loss`` is a function of F and the data, so
Donsker--Varadhan applies with ``KLF_D = KL(law of F under Q || under P)``, bounded
above by the convexity bound on the coupled pairs summed over the evaluation points
(``klF_convexity``; finite for any two architectures). The CGF of ``g_F`` under the
teacher is estimated from teacher particles with fresh channel draws (stream
``channel``). The gaps reported (``gen_T_F``, ``gen_S_F``) average the noise-averaged gap
``gbar_F(w) = E[g_F | w]`` over the particles (the channel noise cancels in expectation:
regression ``gbar_F`` is the squared-loss gap with the ghost points as test set; labels:
``mean_ghost(1 - p_y') - mean_train(1 - p_y)``, ``p = softmax(f_w / tau)``).

F_B3 (classification only): the teacher's parameter-space ball, ``G_D``, ``S_D`` of
``gbar_F``, and ``sigma^2 = sigma_D(rho)^2 + (1/m' + 1/n)/4`` (Hoeffding over the
independent label draws given w). For the Gaussian channel the noise part of ``g_F`` is
chi-square, not sub-Gaussian: F_B3 is NaN with that reason.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import closed_form, streams
from . import bound_tables as ev
from .config import Resolved
from .estimators import sharpness
from .stats import masked_mean_se

F_NAMES = tuple("F_" + b for b in ev.BOUND_NAMES)
CHANNEL_BLOCK = 1 << 14     # particles whose channel draws are made in one call


class Ghost(NamedTuple):
    """Ghost points per dataset (NumPy)."""

    X: np.ndarray    # (E, m, d)
    Y: np.ndarray    # (E, m, k) float, or (E, m) int labels


def ghost_streams(root: jax.Array) -> tuple[jax.Array, jax.Array]:
    key = streams.stream_key(root, "ghost")
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


class Predictions(NamedTuple):
    """Predictions of a population on the evaluation set, float64."""

    train: np.ndarray   # (E, P, n, out) on the training inputs
    ghost: np.ndarray   # (E, P, m, out) on the ghost inputs


# ---------------------------------------------------------------------------------------
# channel draws of g_F (per dataset, per particle, per draw)


@partial(jax.jit, static_argnames=("draws",))
def _gaussian_channel_gaps(keys, r_train, r_ghost, nu_p, *, draws: int):
    """``g_F`` of the Gaussian channel, ``(P, draws)``, from residuals ``y - f_w(x)``.

    With ``a`` the residuals of one set (D = points x k numbers) and ``z`` its channel
    noise, the set's mean loss is ``(||a||^2 / 2 - nu_p a.z + nu_p^2 ||z||^2 / 2) / points``,
    and ``(a.z, ||z||^2)`` has exactly the law of ``(||a|| u, u^2 + c)`` with ``u`` standard
    normal and ``c`` chi-square with D - 1 degrees of freedom, independent (rotate z so
    that a is along its first axis). So a draw costs four random numbers, not D.

    Args:
      keys: ``(P,)`` channel keys; r_train ``(P, n, k)``; r_ghost ``(P, m, k)``.
    """
    def mean_loss(key, r):
        ku, kc = jax.random.split(key)
        D = r.size
        u = streams.normal(ku, (draws,), r.dtype)
        c = jax.random.chisquare(kc, D - 1, (draws,), r.dtype) if D > 1 else jnp.zeros(draws, r.dtype)
        norm2 = jnp.sum(r * r)
        loss = 0.5 * norm2 - nu_p * jnp.sqrt(norm2) * u + 0.5 * nu_p**2 * (u * u + c)
        return loss / r.shape[0]

    def one(key, rt, rg):
        kt, kg = jax.random.split(key)
        return mean_loss(kg, rg) - mean_loss(kt, rt)

    return jax.vmap(one)(keys, r_train, r_ghost)


@partial(jax.jit, static_argnames=("draws",))
def _label_channel_gaps(keys, logits_train, logits_ghost, y_train, y_ghost, tau, *, draws: int):
    """``g_F`` of the categorical channel at temperature tau, ``(P, draws)``."""

    def one(key, lt, lg_):
        logits = jnp.concatenate([lt, lg_]) / tau                       # (n + m, K)
        labels = jax.random.categorical(key, logits, axis=-1, shape=(draws, logits.shape[0]))
        wrong = (labels != jnp.concatenate([y_train, y_ghost])[None]).astype(lt.dtype)
        n = lt.shape[0]
        return wrong[:, n:].mean(-1) - wrong[:, :n].mean(-1)

    return jax.vmap(one)(keys, logits_train, logits_ghost)


def channel_samples(seed: int, preds: Predictions, Y, Y_ghost, classification: bool, nu_p: float,
                    tau: float, draws: int) -> np.ndarray:
    """``(E, P, draws)`` channel draws of ``g_F`` for every particle (keys: stream ``channel``)."""
    E, P = preds.train.shape[:2]
    root = streams.root_key(seed)
    keys = streams.particle_keys(root, "channel", jnp.arange(E, dtype=jnp.uint32),
                                 jnp.arange(P, dtype=jnp.uint32))
    # datasets in vmapped blocks of at most CHANNEL_BLOCK particles (bounded memory),
    # dispatched asynchronously; one device-to-host copy after the loop
    block = max(1, CHANNEL_BLOCK // P)
    out = []
    for lo in range(0, E, block):
        sl = slice(lo, lo + block)
        if classification:
            g = _label_channel_gaps_all(keys[sl], jnp.asarray(preds.train[sl], jnp.float32),
                                        jnp.asarray(preds.ghost[sl], jnp.float32), jnp.asarray(Y[sl]),
                                        jnp.asarray(Y_ghost[sl]), jnp.float32(tau), draws=draws)
        else:
            r_t = jnp.asarray(Y[sl, None] - preds.train[sl], jnp.float32)
            r_g = jnp.asarray(Y_ghost[sl, None] - preds.ghost[sl], jnp.float32)
            g = _gaussian_channel_gaps_all(keys[sl], r_t, r_g, jnp.float32(nu_p), draws=draws)
        out.append(g)
    return np.concatenate([np.asarray(g, np.float64) for g in jax.device_get(out)])


@partial(jax.jit, static_argnames=("draws",))
def _gaussian_channel_gaps_all(keys, r_train, r_ghost, nu_p, *, draws: int):
    """:func:`_gaussian_channel_gaps` for every dataset: leading axis E on each argument."""
    one = lambda k, rt, rg: _gaussian_channel_gaps.__wrapped__(k, rt, rg, nu_p, draws=draws)
    return jax.vmap(one)(keys, r_train, r_ghost)


@partial(jax.jit, static_argnames=("draws",))
def _label_channel_gaps_all(keys, logits_train, logits_ghost, y_train, y_ghost, tau, *, draws: int):
    """:func:`_label_channel_gaps` for every dataset: leading axis E on each array."""
    one = lambda k, lt, lg_, yt, yg: _label_channel_gaps.__wrapped__(k, lt, lg_, yt, yg, tau, draws=draws)
    return jax.vmap(one)(keys, logits_train, logits_ghost, y_train, y_ghost)


def noise_averaged_gap(preds: Predictions, Y, Y_ghost, classification: bool, tau: float) -> np.ndarray:
    """``gbar_F(w)`` per particle, ``(E, P)``."""
    if classification:
        def err(logits, y):
            z = logits / tau
            z = z - z.max(-1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
            return 1.0 - np.take_along_axis(p, y[:, None, :, None].astype(int), -1)[..., 0]
        return err(preds.ghost, Y_ghost).mean(-1) - err(preds.train, Y).mean(-1)
    rt = 0.5 * np.sum((Y[:, None] - preds.train) ** 2, -1).mean(-1)
    rg = 0.5 * np.sum((Y_ghost[:, None] - preds.ghost) ** 2, -1).mean(-1)
    return rg - rt


def convexity(pred_S: Predictions, pred_T: Predictions, classification: bool, nu_p: float,
              tau: float) -> np.ndarray:
    """Per pair: the convexity bound summed over the evaluation points, ``(E, P)``."""
    fS = np.concatenate([pred_S.train, pred_S.ghost], axis=2)
    fT = np.concatenate([pred_T.train, pred_T.ghost], axis=2)
    if classification:
        def logsoft(f):
            z = f / tau
            z = z - z.max(-1, keepdims=True)
            return z - np.log(np.exp(z).sum(-1, keepdims=True))
        lq, lp = logsoft(fS), logsoft(fT)
        return np.sum(np.exp(lq) * (lq - lp), axis=(-1, -2))
    return np.sum((fS - fT) ** 2, axis=(-1, -2)) / (2 * nu_p**2)


# ---------------------------------------------------------------------------------------
# F_B3 curvature of the label channel's noise-averaged gap (MLP classification)


@partial(jax.jit, static_argnames=("apply", "num_iters"))
def _label_gap_curvature(centres, points, X, Y, Xg, Yg, tau, v_gap, *, apply, num_iters: int):
    """``(G_D, S_D)`` of ``gbar_F`` per dataset: gradient norm at the centre, largest
    absolute Hessian eigenvalue over the centre and the points (HVP power iteration)."""

    def one(c, pts, X_e, Y_e, Xg_e, Yg_e, v):
        def gbar(w):
            p = jax.nn.softmax(apply(w, X_e) / tau)
            pg = jax.nn.softmax(apply(w, Xg_e) / tau)
            correct = jnp.take_along_axis(p, Y_e[:, None], 1)[:, 0]
            correct_g = jnp.take_along_axis(pg, Yg_e[:, None], 1)[:, 0]
            return jnp.mean(1 - correct_g) - jnp.mean(1 - correct)

        G = sharpness.gradient_norm(gbar, c)
        allpts = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), c, pts)
        S = jax.lax.map(lambda wv: sharpness.largest_abs_eigenvalue(
            gbar, wv[0], num_iters=num_iters, v0=wv[1]), (allpts, v)).max()
        return G, S

    return jax.vmap(one)(centres, points, X, Y, Xg, Yg, v_gap)


# ---------------------------------------------------------------------------------------


def columns(run, ok: np.ndarray, usable: np.ndarray, pred_T: Predictions, pred_S: Predictions,
            Y: np.ndarray, ghost: Ghost, *, truth_exact: tuple | None = None,
            klF_exact: np.ndarray | None = None, b3: dict | None = None, timer=None):
    """Function-space columns and bounds for one run.

    Args:
      pred_T, pred_S: teacher and student predictions on the training and ghost inputs.
      truth_exact: ``(gen_T_F_exact, gen_S_F_exact)`` where closed forms exist (linear).
      klF_exact: closed form of the convexity bound (linear).
      b3: for the label channel, ``{"G", "S", "rho", "outside"}`` of ``gbar_F``.
    Returns:
      ``(columns, pooled DataFrame, notes)``.
    """
    res: Resolved = run.resolved
    st, nm, est = res.static, res.numeric, run.config.estimators
    classification = st.classification
    E, P = st.num_datasets, st.num_particles
    n, m = st.n, res.ghost_points
    R = est.channel_draws
    nu_p, tau = nm.channel_noise, nm.temperature
    cols: dict[str, np.ndarray] = {}
    notes: list[str] = []

    gbar_T = noise_averaged_gap(pred_T, Y, ghost.Y, classification, tau)
    gbar_S = noise_averaged_gap(pred_S, Y, ghost.Y, classification, tau)
    conv = convexity(pred_S, pred_T, classification, nu_p, tau)
    cols["gen_T_F"], cols["gen_T_F_se"] = masked_mean_se(gbar_T, ok, usable)
    cols["gen_S_F"], cols["gen_S_F_se"] = masked_mean_se(gbar_S, ok, usable)
    cols["klF_convexity"], cols["klF_convexity_se"] = masked_mean_se(conv, ok, usable)
    if truth_exact is not None:
        cols["gen_T_F_exact"], cols["gen_S_F_exact"] = truth_exact
    if klF_exact is not None:
        cols["klF_convexity_exact"] = klF_exact

    # the CGF of g_F under the teacher: particles x fresh channel draws (particle-major)
    g = channel_samples(run.config.seed, pred_T, Y, ghost.Y, classification, nu_p, tau, R)
    n_fit = ev._split(P, est.b3_holdout)
    extra_var = np.full(E, (1.0 / m + 1.0 / n) / 4.0)
    exact_truth = truth_exact is not None
    inp = ev.BoundInputs(
        gen_T=cols["gen_T_F"], gen_T_se=cols["gen_T_F_se"],
        truth=cols["gen_S_F_exact"] if exact_truth else cols["gen_S_F"],
        truth_se=np.zeros(E) if exact_truth else cols["gen_S_F_se"],
        kl=cols["klF_convexity"], kl_se=cols["klF_convexity_se"], kl_reason="",
        g_T=g.reshape(E, P * R), ok=np.repeat(ok, R, axis=1), usable=usable, n_fit=n_fit * R,
        cgf_kind="empirical", exact_cgfs=None,
        sharp=None if b3 is None else {**b3, "extra_var": extra_var},
        sharp_reason="F_B3 needs a sub-Gaussian channel; the Gaussian channel's noise part "
                     "is chi-square" if not classification else "",
        sigma_bounded=1.0 if classification else None,
        c_lam=est.c_lam, ess_fraction=est.ess_fraction)
    bcols, pooled, bnotes = ev.bound_columns(inp, prefix="F_", timer=timer)
    cols.update(bcols)
    notes += bnotes
    notes.append(f"function-space: evaluation set = {n} training inputs + {m} ghost points; "
                 + ("categorical channel at tau = %g (F_B1 with the bounded 0-1 sigma = 1)" % tau
                    if classification else f"Gaussian channel nu_p = {nu_p:g}")
                 + f"; CGF from {R} channel draws per teacher particle.")
    return cols, pooled, notes


def linear_exact(ctx, ghost: Ghost) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Closed forms for the linear task: ``((gen_T_F, gen_S_F), klF_convexity)``."""
    run = ctx.run
    st, nm, data = run.resolved.static, run.resolved.numeric, run.data
    m = ghost.X.shape[1]
    Xg, Yg = ghost.X, ghost.Y
    ghost_data = data._replace(Cxx=np.einsum("emi,emj->eij", Xg, Xg) / m,
                               Cyx=np.einsum("emk,emj->ekj", Yg, Xg) / m,
                               Cyy=np.einsum("emk,emk->e", Yg, Yg) / m)
    ft = ctx.finite_time
    gaps = []
    for M, S in ((ft.M_T, ft.Sigma_T), (ft.M_S, ft.Sigma_S)):
        gaps.append(closed_form.expected_risks(M, S, ghost_data)[1]
                    - closed_form.expected_risks(M, S, data)[1])
    G_eval = st.n * data.Cxx + m * ghost_data.Cxx
    dec = closed_form.decomposition(ft, G_eval, data.Pi, st.rank)
    return (gaps[0], gaps[1]), dec.total / (2 * nm.channel_noise**2)
