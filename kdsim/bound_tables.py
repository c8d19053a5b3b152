"""Bound tables: per-dataset bound inputs to the jitted bound program of
:mod:`kdsim.bounds`, and its arrays to the ``per_dataset`` columns, pooled rows and notes.

The maths lives in :mod:`kdsim.bounds` (pure array functions over datasets); this module
builds the tables and notes apart from it, for every evaluation (linear, models, function
space), so :mod:`kdsim.function_space` and :mod:`kdsim.evaluation` both use it and
neither imports the other's caller.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import bounds
from .estimators import cgf as cgf_mod
from .timing import StageTimer, timer_or_null

BOUND_NAMES = ("B0_upper", "B0_lower", "B1_upper", "B2_lower", "B3_upper")
UPPER = {"B0_upper": True, "B0_lower": False, "B1_upper": True, "B2_lower": False, "B3_upper": True}


class Evaluation(NamedTuple):
    per_dataset: pd.DataFrame
    pooled: pd.DataFrame
    notes: list[str]


MIN_PAIRS = 4


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
    missing = np.isnan(values)
    return pd.arrays.BooleanArray(np.where(missing, False, values != 0), missing)


def _split(P: int, holdout: float) -> int:
    """Number of teacher particles that define the fit (centre, radius, CGF fit)."""
    return max(2, min(P - 1, P - int(round(holdout * P))))


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
    exact_cgfs: cgf_mod.ExactCGF | None  # exact CGFs, leading axis E (linear task), else None
    sharp: dict | None          # {"G", "S", "rho", "outside"} arrays, or None
    sharp_reason: str           # why B3 is NaN when sharp is None
    sigma_bounded: float | None  # sigma = B of a loss bounded in [0, B] (B1 then needs no fit)
    c_lam: float
    ess_fraction: float


def _bucket(n: int) -> int:
    """Array sizes are padded to a power of two (at least 8), so runs of similar sizes
    share one compiled bounds program."""
    return max(8, 1 << max(0, int(n) - 1).bit_length())


def _pad(a: np.ndarray, size: int, fill, axis: int = 0) -> np.ndarray:
    a = np.asarray(a)
    width = [(0, 0)] * a.ndim
    width[axis] = (0, size - a.shape[axis])
    return np.pad(a, width, constant_values=fill)


def _bound_program_inputs(inp: BoundInputs) -> bounds.DatasetInputs:
    """Per-dataset arrays padded to a bucket (call under ``jax.enable_x64``)."""
    E = len(inp.gen_T)
    Ep = _bucket(E)
    f64 = lambda a, fill=np.nan: jnp.asarray(_pad(np.asarray(a, np.float64), Ep, fill))
    hold_ok = inp.ok[:, inp.n_fit:]
    has_check = (np.ones(E, bool) if inp.exact_cgfs is not None
                 else hold_ok.sum(axis=1) >= MIN_PAIRS)
    sharp = inp.sharp or {}
    zeros = np.zeros(E)
    return bounds.DatasetInputs(
        kl=f64(inp.kl), kl_se=f64(inp.kl_se, 0.0), gen_T=f64(inp.gen_T), gen_T_se=f64(inp.gen_T_se),
        truth=f64(inp.truth), truth_se=f64(inp.truth_se),
        used=jnp.asarray(_pad(inp.usable & ~np.isnan(inp.kl), Ep, False)),
        has_check=jnp.asarray(_pad(has_check, Ep, False)),
        G=f64(sharp.get("G", zeros)), S=f64(sharp.get("S", zeros)), rho=f64(sharp.get("rho", zeros)),
        outside=f64(sharp.get("outside", zeros)), extra_var=f64(sharp.get("extra_var", zeros), 0.0))


def bound_arrays(inp: BoundInputs) -> tuple[bounds.DatasetBounds, bounds.PooledBounds | None]:
    """Every bound of every dataset and the pooled bounds, as NumPy arrays (one jitted
    program, one device-to-host copy); the pooled bounds are None when no dataset has
    bounds.

    Datasets are padded to a power of two and particles too, so runs of similar sizes,
    every loss and every bound family with the same CGF kind share one program. An
    empirical CGF is fitted on the first ``n_fit`` surviving particles and checked on
    the rest (where there are at least :data:`MIN_PAIRS` of them), both from one array
    of gaps with two masks; an exact CGF (linear task) checks the assumptions whenever
    it is given.
    """
    E = len(inp.gen_T)
    Ep = _bucket(E)
    with jax.enable_x64(True):
        x = _bound_program_inputs(inp)
        exact = None
        if inp.exact_cgfs is not None:
            exact = jax.tree_util.tree_map(lambda a: jnp.asarray(_pad(a, Ep, 1.0)), inp.exact_cgfs)
        kw = dict(sigma_bounded=inp.sigma_bounded, has_b3=inp.sharp is not None)
        if inp.cgf_kind == "exact":
            out = bounds.all_bounds(x, exact, exact, inp.c_lam, **kw)
        else:
            N = inp.g_T.shape[1]
            Np = _bucket(N)
            first = np.arange(N) < inp.n_fit
            g = _pad(_pad(np.asarray(inp.g_T, np.float64), Ep, 0.0), Np, 0.0, axis=1)
            mask = lambda m: jnp.asarray(_pad(_pad(m, Ep, False), Np, False, axis=1))
            out = bounds.empirical_bounds(x, jnp.asarray(g), mask(inp.ok & first), mask(inp.ok & ~first),
                                          inp.ess_fraction, inp.c_lam, exact=exact, **kw)
        per, pooled = jax.device_get(out)
    per = bounds.DatasetBounds(*(np.asarray(a, np.float64)[..., :E] for a in per))
    pooled = bounds.PooledBounds(*(np.asarray(a, np.float64) for a in pooled))
    if not np.any(inp.usable & ~np.isnan(inp.kl)):
        pooled = None
    return per, pooled


def _bound_table(per: bounds.DatasetBounds, inp: BoundInputs, sfx) -> dict[str, np.ndarray]:
    """Per-dataset columns of the bounds: values, tightness, inputs, flags."""
    out = {}
    for name in ("sigma_B1", "lam_max", "B0_lam", "B0_eta", "B2_eta", "B2_eps", "rho0"):
        out[sfx(name)] = getattr(per, name)
    for b, name in enumerate(BOUND_NAMES):
        out[sfx(name)] = per.value[b]
    if inp.exact_cgfs is not None:
        out[sfx("kappa_min")] = np.asarray(inp.exact_cgfs.kappa_min, np.float64)
        out[sfx("kappa_max")] = np.asarray(inp.exact_cgfs.kappa_max, np.float64)
    for b, name in enumerate(BOUND_NAMES):
        sign = 1.0 if UPPER[name] else -1.0
        out[sfx(f"{name}_tightness")] = sign * (per.value[b] - inp.truth)
    for b, name in enumerate(BOUND_NAMES):
        out[sfx(f"{name}_valid")] = per.valid[b]
        out[sfx(f"{name}_assumption")] = per.assumption[b]
    return out


def _bound_notes(inp: BoundInputs, cols: dict[str, np.ndarray], sfx) -> list[str]:
    """Why bounds are infinite or NaN, the CGF's range, and every failed flag."""
    notes = []
    if inp.kl_reason:
        what = "+inf / -inf" if np.isinf(inp.kl).any() else "NaN"
        notes.append(f"{', '.join(sfx(b) for b in BOUND_NAMES)}: {what}: {inp.kl_reason}.")
    elif inp.sharp is None:
        notes.append(f"{sfx('B3_upper')}: NaN: {inp.sharp_reason}.")
    if inp.exact_cgfs is not None:
        if np.nanmax(cols[sfx("kappa_max")]) > 0 and inp.sigma_bounded is None:
            notes.append(
                "kappa_max > 0: the upper tail of the teacher's gap is sub-exponential, NOT "
                "sub-Gaussian for all lam; B1 uses lam_max = c_lam / kappa_max "
                f"(c_lam = {inp.c_lam}).")
        if np.nanmin(cols[sfx("kappa_min")]) < 0:
            notes.append(
                "kappa_min < 0: Lambda_D(-eta) = +inf for eta >= 1/|kappa_min|; the B2 grid and "
                "B0's lower search stop there.")
    for name in ("B1_upper", "B2_lower", "B3_upper"):
        failed = np.flatnonzero(cols[sfx(f"{name}_assumption")] == 0)
        if failed.size:
            why = " (held-out teacher mass outside the B3 ball > 0)" if name == "B3_upper" else ""
            notes.append(f"{sfx(name + '_assumption')}: False in datasets {failed.tolist()}{why}")
    for name in BOUND_NAMES:
        broken = np.flatnonzero(cols[sfx(f"{name}_valid")] == 0)
        if broken.size:
            notes.append(f"{sfx(name + '_valid')}: False in datasets {broken.tolist()} (the bound "
                         "fails on the truth beyond 3 standard errors)")
    return notes


def _pooled_table(pooled: bounds.PooledBounds | None, suffix: str, prefix: str = "") -> pd.DataFrame:
    """The pooled bounds as a DataFrame indexed by bound name."""
    columns = ["value", "truth", "tightness", "valid"]
    if pooled is None:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="bound"), dtype=float)
    rows = {prefix + name + suffix: (float(pooled.value[i]), float(pooled.truth),
                                     float(pooled.tightness[i]), float(pooled.valid[i]))
            for i, name in enumerate(bounds.POOLED_NAMES)}
    df = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    df.index.name = "bound"
    return df


def bound_columns(inp: BoundInputs, suffix: str = "", prefix: str = "",
                  timer: StageTimer | None = None):
    """Bounds B0--B3 per dataset, their flags, and the pooled bounds.

    Returns ``(columns, pooled DataFrame, notes)``; column names carry ``prefix``
    (``"F_"`` for the function-space bounds) and ``suffix`` (``"_01"`` for the 0-1 loss).
    ``inp.sharp`` may carry ``"extra_var"``: a variance proxy added to ``sigma_D(rho)^2``
    (the label draws of the function-space B3). The maths runs for all datasets in one
    program (:func:`bound_arrays`); the tables and notes are built from its arrays.
    """
    timer = timer_or_null(timer)
    sfx = lambda name: prefix + name + suffix
    with timer("bounds"):
        per, pooled = bound_arrays(inp)
    with timer("tables"):
        cols = _bound_table(per, inp, sfx)
        return cols, _pooled_table(pooled, suffix, prefix), _bound_notes(inp, cols, sfx)


