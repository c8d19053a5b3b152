"""The CMI rows of a supersample run (SPEC §10): from the trained students to ``res.pooled``.

One entry point, :func:`cmi_evaluation` (run -> per-dataset columns, pooled rows, notes),
built from two array steps the evaluation pipeline can call directly:
:func:`student_arrays` (the students' losses and labels on both points of every pair,
and each particle's true gap on the bounded loss) and :func:`cmi_rows` (the maths of
:mod:`kdsim.estimators.cmi` and its table).

The loss: the 0-1 loss for classification (B = 1); for regression the squared loss
``0.5 ||y - f||^2`` clipped to ``[0, estimators.loss_clip]``, or NaN rows with the reason
when ``loss_clip`` is null. The truth is the student's mean gap on the SAME loss over all
supersample x mask datasets: population risk minus training risk per particle, the
population risk from fresh test points (``task.n_test`` per dataset, streams ``test`` /
``test_y``; linear and planted tasks) or the exact pool average (pool tasks). Its
standard error is taken over supersamples (the masks of one supersample share its
points).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import streams
from .estimators import cmi
from .tasks import linear_gaussian as lg
from .tasks import pool as pool_task
from .tasks import supersample as ss

# Grid steps of the stochastic rounding of clipped losses (kdsim.estimators.cmi). One step
# rounds a loss l to B with probability l / B, else 0: a 0-1 loss with the same expected
# gap, so every 0-1 form (the binary-KL ld bound included) applies. Measured on the linear
# task (d = 4, n = 16, clip 1, M x P = 1024, truth 0.066): ecmi_upper 0.16 / 0.29 / 0.47
# and ldcmi_upper 0.15 / 0.25 / 0.31 with 1 / 4 / 16 steps: more levels keep more
# information but the plug-in bias grows faster (null e-MI 0.004 / 0.018 / 0.088 nats).
CLIPPED_BINS = 1
CHUNK = 8            # particles evaluated at once per dataset
VALID_Z = 3.0        # a bound holds on the truth if value >= truth - 3 se
CHECK_Z = 4.0        # the held-out gap agrees with the truth if |z| <= 4

ROWS = ("fcmi_upper", "ecmi_upper", "ldcmi_upper", "ldcmi_fast_upper", "ecmi_kl_upper",
        "ldcmi_kl_upper", "ldcmi_interpolating", "supersample_heldout_gap")


class StudentArrays(NamedTuple):
    """What the CMI rows need of a supersample run (NumPy, float64 / int)."""

    U: np.ndarray             # (S, M, n) masks
    weight: np.ndarray        # (S, M, P) 1 = surviving pair, 0 = diverged
    losses: np.ndarray        # (S, M, P, n, 2) bounded loss on both points of each pair
    labels: np.ndarray | None  # (S, M, P, n, 2) predicted labels (classification)
    truth: np.ndarray         # (S, M, P) population minus training risk of the bounded loss
    uniforms: np.ndarray      # (S, M, P, n, 2) rounding uniforms (stream cmi_rounding)
    B: float
    bins: int
    num_classes: int
    loss: str                 # "01" | "clipped"


def _bounded_loss(classification: bool, B) -> Callable:
    """Per-example loss in [0, B]: 0-1, or the squared loss clipped at B."""
    if classification:
        return lambda f, y: (jnp.argmax(f) != y).astype(f.dtype)
    return lambda f, y: jnp.minimum(0.5 * jnp.sum((y - f) ** 2), B)


@partial(jax.jit, static_argnames=("apply", "classification"))
def _pair_losses(params, X, Y, B, *, apply, classification):
    """Bounded losses ``(E, P, m)`` of a population on per-dataset points ``X (E, m, ...)``,
    ``Y (E, m, ...)``, and the predicted labels (classification; else None). Only these
    leave the program, never the ``(E, P, m, out)`` predictions."""
    loss = _bounded_loss(classification, B)

    def one(w, X_e, Y_e):
        f = apply(w, X_e)
        return jax.vmap(loss)(f, Y_e), (jnp.argmax(f, axis=-1).astype(jnp.int32)
                                       if classification else None)

    return jax.vmap(lambda w_e, X_e, Y_e: jax.lax.map(lambda w: one(w, X_e, Y_e), w_e,
                                                      batch_size=CHUNK))(params, X, Y)


@partial(jax.jit, static_argnames=("apply", "classification"))
def _test_risk(params, X_test, Y_test, B, *, apply, classification):
    """Mean bounded loss ``(E, P)`` on per-dataset test sets ``(E, m, ...)``, or on a pool's
    :class:`kdsim.tasks.pool.Blocks` (exact pool average; ``Y_test`` None)."""
    loss = _bounded_loss(classification, B)
    if isinstance(X_test, pool_task.Blocks):
        blocks = X_test

        def pooled(w):
            def body(acc, blk):
                Xb, Yb, wb = blk
                return acc + jnp.sum(wb * jax.vmap(loss)(apply(w, Xb), Yb)), None
            return jax.lax.scan(body, jnp.zeros((), blocks.weight.dtype),
                                (blocks.X, blocks.Y, blocks.weight))[0]

        return jax.vmap(lambda w_e: jax.lax.map(pooled, w_e, batch_size=CHUNK))(params)
    return jax.vmap(lambda w_e, X_e, Y_e: jax.lax.map(
        lambda w: jnp.mean(jax.vmap(loss)(apply(w, X_e), Y_e)), w_e, batch_size=CHUNK))(
        params, X_test, Y_test)


def _linear_apply(W, X):
    return X @ W.T


def student_arrays(run: Any) -> StudentArrays | str:
    """The students' bounded losses (and labels) on the pairs, and their true gaps; or the
    reason the CMI rows are NaN (a string)."""
    st, cfg, data, pops = run.resolved.static, run.config, run.data, run.populations
    classification = st.classification
    if classification:
        B, bins, name = 1.0, 1, "01"
    else:
        if cfg.estimators.loss_clip is None:
            return ("the squared loss is unbounded: set estimators.loss_clip = B to bound the "
                    "clipped loss min(0.5 ||y - f||^2, B)")
        B, bins, name = float(cfg.estimators.loss_clip), CLIPPED_BINS, "clipped"
    S, M, P, n, E = st.supersamples, st.masks, st.num_particles, st.n, st.num_datasets
    pairs = ss.pairs_of(run)
    root = streams.root_key(cfg.seed)
    linear = st.task == "linear_gaussian"
    apply = _linear_apply if linear else run.models[1].apply
    dtype = jnp.float64 if linear else jnp.dtype(st.dtype)
    with jax.enable_x64(linear or st.dtype == "float64"):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), pops.student)
        X2 = jnp.asarray(pairs.X.reshape((E, 2 * n) + pairs.X.shape[3:]), dtype)
        Y2 = pairs.Y.reshape((E, 2 * n) + pairs.Y.shape[3:])
        Y2 = jnp.asarray(Y2) if classification else jnp.asarray(Y2, dtype)
        losses, labels = _pair_losses(params, X2, Y2, jnp.asarray(B, dtype), apply=apply,
                                      classification=classification)
        losses = np.asarray(losses, np.float64).reshape(E, P, n, 2)
        labels = None if labels is None else np.asarray(labels).reshape(E, P, n, 2)
        if linear:
            Xt, Yt = lg.sample_points(streams.stream_key(root, "test"),
                                      streams.stream_key(root, "test_y"), np.arange(E),
                                      st.n_test, data.W_star, data.sx, data.noise)
            Xt, Yt = jnp.asarray(Xt), jnp.asarray(Yt)
        elif st.task == "pool":
            Xt, Yt = pool_task.blocks(data.pool, dtype), None
        else:
            Xt = jnp.asarray(data.X_test, dtype)
            Yt = jnp.asarray(data.Y_test) if classification else jnp.asarray(data.Y_test, dtype)
        risk = np.asarray(_test_risk(params, Xt, Yt, jnp.asarray(B, dtype), apply=apply,
                                     classification=classification), np.float64)     # (E, P)
    train = np.take_along_axis(losses, pairs.U[:, None, :, None], axis=-1)[..., 0].mean(-1)
    ok = ~pops.diverged_T & ~pops.diverged_S
    truth = np.where(ok, risk - train, 0.0)
    with jax.enable_x64(True):
        keys = jax.vmap(lambda e: streams.dataset_key(root, "cmi_rounding", e))(
            jnp.arange(E, dtype=jnp.uint32))
        uniforms = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (P, n, 2), jnp.float64))(keys))
    shape = lambda a: a.reshape((S, M) + a.shape[1:])
    return StudentArrays(
        U=shape(pairs.U), weight=shape(ok.astype(np.float64)),
        losses=shape(np.where(ok[..., None, None], losses, 0.0)),
        labels=None if labels is None else shape(np.where(ok[..., None, None], labels, 0)),
        truth=shape(truth), uniforms=shape(uniforms), B=B, bins=bins,
        num_classes=st.num_classes if classification else 0, loss=name)


def _se(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


def bounds_and_truth(arrays: StudentArrays) -> tuple[cmi.CMIBounds, np.ndarray]:
    """The bounds of :func:`kdsim.estimators.cmi.cmi_bounds` (NumPy) and the truth per
    supersample ``(S,)`` (mean over its masks' surviving particles)."""
    a = arrays
    with jax.enable_x64(True):
        r = jax.device_get(cmi.cmi_bounds(
            jnp.asarray(a.U), jnp.asarray(a.weight), jnp.asarray(a.losses),
            jnp.asarray(a.uniforms), None if a.labels is None else jnp.asarray(a.labels),
            jnp.float64(a.B), bins=a.bins, num_classes=a.num_classes))
    count = a.weight.sum(axis=(1, 2))
    return r, a.truth.sum(axis=(1, 2)) / np.maximum(count, 1)


def cmi_rows(arrays: StudentArrays) -> tuple[pd.DataFrame, list[str]]:
    """The CMI bounds of one supersample run as pooled rows (columns ``value, truth,
    tightness, valid, family, loss``) and their notes (plug-in bias, samples, checks)."""
    a = arrays
    r, truth_s = bounds_and_truth(a)
    S = a.U.shape[0]
    truth, truth_se = float(truth_s.mean()), _se(truth_s)      # se over supersamples
    diff = np.asarray(r.heldout_gap_s) - truth_s
    z = float(diff.mean() / _se(diff)) if S > 1 and _se(diff) > 0 else float("nan")
    values = {
        "fcmi_upper": r.fcmi, "ecmi_upper": r.ecmi, "ldcmi_upper": r.ldcmi,
        "ldcmi_fast_upper": r.ldcmi_fast, "ecmi_kl_upper": r.ecmi_kl,
        "ldcmi_kl_upper": r.ldcmi_kl, "ldcmi_interpolating": r.ldcmi_interp,
        "supersample_heldout_gap": r.heldout_gap,
    }
    rows = {}
    for name in ROWS:
        v = float(values[name])
        if name == "supersample_heldout_gap":
            valid = float("nan") if np.isnan(z) else float(abs(z) <= CHECK_Z)
        else:   # one supersample gives no standard error: validity unknown
            valid = (float("nan") if np.isnan(v) or not np.isfinite(truth_se)
                     else float(v >= truth - VALID_Z * truth_se))
        rows[name] = (v, truth, v - truth, valid, "generic", a.loss)
    df = pd.DataFrame.from_dict(rows, orient="index",
                                columns=["value", "truth", "tightness", "valid", "family", "loss"])
    df.index.name = "bound"
    M, P = a.weight.shape[1:]
    mi, null = np.asarray(r.mi), np.asarray(r.mi_null)
    fam = lambda arr: ", ".join(f"{f} {x:.4g}" for f, x in zip(("f", "e", "ld"), arr))
    grid = f"{{0, {a.B:g}}}" if a.bins == 1 else f"{a.bins + 1} levels {{0, ..., {a.B:g}}}"
    loss_desc = ("the 0-1 loss" if a.loss == "01" else
                 f"the squared loss clipped to [0, {a.B:g}], stochastically rounded onto {grid} "
                 "(exact in expectation, so the bounds stay valid)")
    notes = [
        f"CMI bounds (supersample design) on {loss_desc}: {S} supersamples x {M} masks x {P} particles; "
        f"plug-in MI per pair from {float(r.samples):.0f} samples (M x P); mean MI per pair "
        f"(nats): {fam(mi)}; truth {truth:.4g} +- {truth_se:.2g} (se over supersamples)",
        f"CMI plug-in bias: the same MIs with each mask paired with another mask's particles "
        f"(true MI 0) are {fam(null)} nats; the square-root bounds at that null MI would read "
        f"{fam(np.asarray(r.null_bound))} (what pure estimation noise adds, at M x P = {M * P})",
    ]
    if np.isnan(r.fcmi):
        notes.append("fcmi_upper: NaN, f-CMI needs discrete predictions (classification); "
                     "regression predictions are continuous")
    if a.bins != 1:
        notes.append("ldcmi_kl_upper, ldcmi_interpolating: NaN, they need losses on two levels "
                     "(loss differences in {-B, 0, B})")
    elif not np.isnan(r.ldcmi_kl) and float(r.interpolating) == 0:
        what = "0-1 error" if a.loss == "01" else "rounded loss"
        notes.append(f"ldcmi_interpolating: NaN, the student does not interpolate (mean "
                     f"training {what} {float(r.train_loss):.3g} > 0); the identity needs "
                     "zero training loss on every run")
    if not np.isnan(z) and abs(z) > CHECK_Z:
        notes.append(
            f"supersample_heldout_gap: the held-out halves give a gap of {float(r.heldout_gap):.4g} "
            f"against the independent truth {truth:.4g} (z = {z:.1f}): the masks are NOT "
            "independent of the data (or the held-out points are not fresh draws); the CMI "
            "bounds are then invalid")
    for name in ROWS[:-1]:
        if rows[name][3] == 0.0:
            notes.append(f"{name}: below the truth by more than {VALID_Z:g} se "
                         f"({rows[name][0]:.4g} < {truth:.4g})")
    return df, notes


def nan_rows(reason: str, loss: str) -> tuple[pd.DataFrame, list[str]]:
    rows = {name: (np.nan, np.nan, np.nan, np.nan, "generic", loss) for name in ROWS}
    df = pd.DataFrame.from_dict(rows, orient="index",
                                columns=["value", "truth", "tightness", "valid", "family", "loss"])
    df.index.name = "bound"
    return df, [f"{', '.join(ROWS)}: NaN, {reason}"]


def cmi_evaluation(run: Any) -> tuple[dict[str, np.ndarray], pd.DataFrame, list[str]]:
    """Per-dataset columns ``supersample``, ``mask``; the CMI pooled rows; their notes."""
    st = run.resolved.static
    e = np.arange(st.num_datasets)
    cols = {"supersample": e // st.masks, "mask": e % st.masks}
    note = ("supersample run: res.summary's standard errors treat the supersamples x masks "
            "datasets as independent, but the masks of one supersample share its points; "
            "cluster by the per_dataset column `supersample` (the CMI rows do)")
    arrays = student_arrays(run)
    if isinstance(arrays, str):
        pooled, notes = nan_rows(arrays, "01" if st.classification else "clipped")
    else:
        pooled, notes = cmi_rows(arrays)
    return cols, pooled, notes + [note]
