"""The generic bounds' columns and pooled rows (SPEC §10), and the ``family`` / ``loss``
columns of every pooled row.

:func:`generic_rows` is one function of arrays (:class:`GenericInputs`) returning the
pooled rows and their notes; :func:`extend` builds those arrays from a finished run
(per-dataset trajectory columns, the bounded-loss truth) and appends the rows to the
evaluation's tables, so any evaluation pipeline can call it once at its end.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import closed_form, streams
from . import generic_bounds as gb
from .bounds import VALIDITY_Z
from .stats import masked_mean_se
from .tasks import linear_gaussian as lg

MIN_PAIRS = 2

# per-dataset trajectory columns: (column, population field, index in the sums)
TRAJ_COLUMNS = (("traj_teacher", "traj_teacher", 0), ("traj_student", "traj_student", 0),
                ("traj_bs_teacher", "traj_teacher", 1), ("traj_bs_student", "traj_student", 1))


class GenericInputs(NamedTuple):
    """Everything the generic rows need, as arrays over datasets ``(E,)``."""

    traj: dict                # column name (TRAJ_COLUMNS) -> (E,) per-dataset sums (NaN: none)
    traj_se: dict             # the same -> (E,) standard errors
    truth: np.ndarray         # (E,) gen_S on the bounded loss (NaN: none)
    truth_se: np.ndarray      # (E,)
    loss: str                 # "01" | "clipped": the bounded loss of the truth and the bounds
    loss_bound: float         # B (NaN: no bounded loss, the rows are NaN)
    loss_reason: str          # why loss_bound is NaN ("" otherwise)
    student_alone: bool       # the student's run does not depend on the teacher (alpha = 1)
    gibbs: gb.GibbsIdentity | None = None   # linear task only


def _pooled_mean(x: np.ndarray, se: np.ndarray) -> tuple[float, float]:
    """Mean over the datasets where x is finite, and its standard error (independent datasets)."""
    keep = np.isfinite(x)
    if not keep.any():
        return float("nan"), float("nan")
    m = keep.sum()
    return float(x[keep].mean()), float(np.sqrt(np.sum(np.where(np.isfinite(se[keep]), se[keep], 0.0) ** 2)) / m)


def _sqrt_se(value: float, k: float, k_se: float) -> float:
    """Delta-method se of a bound ``c sqrt(K)`` from the se of K."""
    return 0.5 * value * k_se / k if k > 0 else float("nan")


COLUMNS = ["value", "truth", "tightness", "valid", "family", "loss", "value_se", "truth_se",
           "assumption"]


def generic_rows(inp: GenericInputs) -> tuple[pd.DataFrame, list[str]]:
    """Pooled rows ``incoherence_upper``, ``bayes_stability_upper``, ``kd_split_upper``
    (upper bounds on ``E_D gen_S(D)`` on the bounded loss) and, on the linear task,
    ``gibbs_identity``. ``valid``: the bound holds on the truth within
    ``VALIDITY_Z`` combined standard errors; ``assumption``: 1.0 where the bound's
    assumption holds (the generic single-run bounds need a student whose run does not
    depend on the teacher, i.e. alpha = 1; the KD split always applies).
    """
    rows, notes = {}, []
    truth, truth_se = _pooled_mean(inp.truth, inp.truth_se)
    B = inp.loss_bound
    K = {name: _pooled_mean(inp.traj[name], inp.traj_se[name]) for name in inp.traj}
    kT, kS = K["traj_teacher"], K["traj_student"]
    values = {
        "incoherence_upper": (float(gb.incoherence_bound(kS[0], B)), kS, inp.student_alone),
        "bayes_stability_upper": (float(gb.bayes_stability_bound(K["traj_bs_student"][0], B)),
                                  K["traj_bs_student"], inp.student_alone),
        "kd_split_upper": (float(gb.kd_split_bound(kT[0], kS[0], B)),
                           (kT[0] + kS[0], float(np.hypot(kT[1], kS[1]))), True),
    }
    for name, (value, (k, k_se), assumption) in values.items():
        v_se = _sqrt_se(value, k, k_se)
        se = np.hypot(np.nan_to_num(v_se), np.nan_to_num(truth_se))
        valid = float(truth <= value + VALIDITY_Z * se) if np.isfinite(value) and np.isfinite(truth) \
            else float("nan")
        rows[name] = (value, truth, value - truth, valid, "generic", inp.loss, v_se, truth_se,
                      float(assumption))
    if not np.isfinite(B):
        notes.append(f"incoherence_upper, bayes_stability_upper, kd_split_upper: NaN, {inp.loss_reason}")
    elif not np.isfinite(kS[0]):
        notes.append("incoherence_upper, bayes_stability_upper, kd_split_upper: NaN, no student "
                     "trajectory sums (estimators.trajectory_bounds = false)")
    if not inp.student_alone:
        notes.append("incoherence_upper, bayes_stability_upper: assumption False: they treat the "
                     "student's run alone (its partner as fixed), but with alpha < 1 the partner "
                     "was trained on the same data; kd_split_upper adds the teacher's phase and "
                     "holds for any student")
    g = inp.gibbs
    if g is not None:
        valid = float(abs(g.value - g.truth) <= VALIDITY_Z * g.diff_se)
        rows["gibbs_identity"] = (g.value, g.truth, g.value - g.truth, valid, "generic", "squared",
                                  g.value_se, g.truth_se, 1.0)
        notes.append(f"gibbs_identity: stationary pair KL / gamma = {g.value:.4g} against mean "
                     f"stationary gen_T = {g.truth:.4g}; se of the difference {g.diff_se:.3g} "
                     "(U-statistic over ordered pairs of datasets); valid = they agree within "
                     f"{VALIDITY_Z:g} se")
    df = pd.DataFrame.from_dict(rows, orient="index", columns=COLUMNS)
    df.index.name = "bound"
    return df, notes


def label_rows(pooled: pd.DataFrame, classification: bool) -> pd.DataFrame:
    """Add ``family`` (``kd``) and ``loss`` to the KD rows that lack them: ``01`` for the
    0-1 rows (suffix ``_01``) and the function-space rows of classification (their
    hypothesis is a drawn label), ``ce`` for the other classification rows, else
    ``squared``."""
    pooled = pooled.copy()
    if "family" not in pooled:
        pooled["family"] = pd.Series(index=pooled.index, dtype=object)
        pooled["loss"] = pd.Series(index=pooled.index, dtype=object)
    for name in pooled.index:
        if isinstance(pooled.at[name, "family"], str):
            continue
        if not classification:
            loss = "squared"
        elif name.endswith("_01") or name.startswith("F_"):
            loss = "01"
        else:
            loss = "ce"
        pooled.at[name, "family"], pooled.at[name, "loss"] = "kd", loss
    return pooled


# ---------------------------------------------------------------------------------------
# from a run to the inputs


def trajectory_columns(pops, ok: np.ndarray, usable: np.ndarray, n: int) -> tuple[dict, list[str]]:
    """Per-dataset means (over surviving pairs) of the trajectory sums, with their se."""
    E = ok.shape[0]
    cols, notes = {}, []
    for col, field, i in TRAJ_COLUMNS:
        sums = getattr(pops, field, None)
        cols[col], cols[col + "_se"] = np.full(E, np.nan), np.full(E, np.nan)
        if sums is None or (i == 0 and n < 2):
            continue
        cols[col], cols[col + "_se"] = masked_mean_se(np.asarray(sums)[..., i], ok, usable)
    if getattr(pops, "traj_teacher", None) is None:
        notes.append("traj_*: NaN, estimators.trajectory_bounds = false")
    elif n < 2:
        notes.append("traj_teacher, traj_student: NaN, leaving one point out needs n >= 2")
    return cols, notes


@partial(jax.jit, static_argnames=("apply", "block"))
def _clipped_losses(params, X, Y, B, *, apply, block: int = 1):
    """``(E, P, m)`` clipped squared losses ``min(0.5 ||y - f(x)||^2, B)`` of every
    particle on its dataset's points (datasets one at a time: bounded memory)."""
    def one_dataset(args):
        p_e, X_e, Y_e = args
        f = jax.vmap(lambda w: apply(w, X_e))(p_e)                     # (P, m, k)
        return jnp.minimum(0.5 * jnp.sum((Y_e[None] - f) ** 2, -1), B)
    return jax.lax.map(one_dataset, (params, X, Y), batch_size=block)


def _linear_apply(W, X):
    return X @ W.T


def clipped_truth(run, ok: np.ndarray, usable: np.ndarray, B: float) -> tuple[np.ndarray, np.ndarray]:
    """``gen_S(D)`` on the squared loss clipped at B, per dataset, and its se (particles
    and, with a finite test sample, the test points' noise)."""
    st, data = run.resolved.static, run.data
    E = st.num_datasets
    if st.task == "linear_gaussian":
        params, apply = run.populations.student, _linear_apply
        root = streams.root_key(run.config.seed)
        key = streams.stream_key(root, "clip_test")
        Xt, Yt = lg.sample_points(jax.random.fold_in(key, 0), jax.random.fold_in(key, 1),
                                  np.arange(E), st.n_test, data.W_star, data.sx, data.noise)
    elif st.task == "pool":
        params, apply = run.populations.student, run.models[1].apply
        Xt = np.broadcast_to(data.pool.X, (E,) + data.pool.X.shape)
        Yt = np.broadcast_to(data.pool.Y, (E,) + data.pool.Y.shape)
    else:
        params, apply = run.populations.student, run.models[1].apply
        Xt, Yt = data.X_test, data.Y_test
    exact = st.task == "pool"
    with jax.enable_x64(True):
        tr = np.asarray(_clipped_losses(params, np.asarray(data.X, np.float64),
                                        np.asarray(data.Y, np.float64), B, apply=apply))
        te = np.asarray(_clipped_losses(params, np.asarray(Xt, np.float64),
                                        np.asarray(Yt, np.float64), B, apply=apply))
    gap = te.mean(-1) - tr.mean(-1)                                  # (E, P)
    truth, se_p = masked_mean_se(gap, ok, usable)
    # the test points are shared by the particles: their own sampling noise
    if exact:
        se_t = 0.0
    else:
        per_point = np.einsum("ep,epm->em", ok, te) / np.maximum(ok.sum(1), 1)[:, None]   # (E, m)
        se_t = np.std(per_point, axis=-1, ddof=1) / np.sqrt(te.shape[-1])
    return truth, np.where(usable, np.hypot(se_p, se_t), np.nan)


def gibbs_inputs(run) -> gb.GibbsIdentity | None:
    """The Gibbs identity of the linear task from the stationary teacher laws."""
    st, nm, data = run.resolved.static, run.resolved.numeric, run.data
    if st.task != "linear_gaussian" or st.num_datasets < 3:
        return None
    laws = closed_form.stationary(data, st, nm)
    A_T = closed_form.precision_matrices(data, nm)[0]
    gen_T = closed_form.expected_gaps(laws, data)[0]
    return gb.gibbs_identity(laws.M_T, A_T, nm.teacher.gamma, gen_T)


def generic_columns(run, columns) -> tuple[dict[str, np.ndarray], pd.DataFrame, list[str]]:
    """The trajectory columns, the generic pooled rows and their notes of one run, given
    the per-dataset ``columns`` (a mapping of ``(E,)`` arrays: the 0-1 truths of
    classification, ``gen_S_01`` and its ``_se``, are read from it)."""
    st = run.resolved.static
    pops = run.populations
    ok = ~pops.diverged_T & ~pops.diverged_S
    usable = ok.sum(1) >= MIN_PAIRS
    cols, tnotes = trajectory_columns(pops, ok, usable, st.n)
    E = st.num_datasets
    B, reason = float("nan"), ""
    if st.classification:
        loss, B = "01", 1.0
        if "gen_S_01" in columns:
            truth = np.asarray(columns["gen_S_01"], np.float64)
            truth_se = np.asarray(columns["gen_S_01_se"], np.float64)
        else:   # an evaluation without the 0-1 columns: the bounds, but no truth
            truth, truth_se = np.full(E, np.nan), np.full(E, np.nan)
    else:
        loss, clip = "clipped", run.config.estimators.loss_clip
        if clip is None:
            truth, truth_se = np.full(E, np.nan), np.full(E, np.nan)
            reason = ("regression needs a bounded loss: set estimators.loss_clip (the squared "
                      "loss clipped at B)")
        else:
            B = float(clip)
            truth, truth_se = clipped_truth(run, ok, usable, B)
    if loss == "clipped" and np.isfinite(B):   # the truth of the bounds, a column of its own
        cols["gen_S_clipped"], cols["gen_S_clipped_se"] = truth, truth_se
    inp = GenericInputs(traj={c: cols[c] for c, _, _ in TRAJ_COLUMNS},
                        traj_se={c: cols[c + "_se"] for c, _, _ in TRAJ_COLUMNS},
                        truth=truth, truth_se=truth_se, loss=loss, loss_bound=B, loss_reason=reason,
                        student_alone=run.resolved.numeric.alpha == 1.0, gibbs=gibbs_inputs(run))
    rows, gnotes = generic_rows(inp)
    return cols, rows, list(tnotes) + list(gnotes)


def extend(run, per_dataset: pd.DataFrame, pooled: pd.DataFrame, notes: list[str]):
    """Append the trajectory columns, the generic pooled rows and their notes to an
    evaluation's tables, and label every pooled row with ``family`` and ``loss``."""
    cols, rows, gnotes = generic_columns(run, per_dataset)
    per_dataset = pd.concat([per_dataset, pd.DataFrame(cols, index=per_dataset.index)], axis=1)
    pooled = pd.concat([label_rows(pooled, run.resolved.static.classification), rows])
    pooled.index.name = "bound"
    return per_dataset, pooled, list(notes) + gnotes
