"""``kdsim.simulate(config) -> Result``: train the populations, estimate, evaluate.

A pure function of a validated config: the same config and seed give bit-identical
results on the same machine.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple

import numpy as np
import pandas as pd

from . import closed_form, populations, streams
from .config import ConfigError, Resolved, SimConfig, resolve
from .estimators import predictive
from .result import Result, summarize
from .stats import mean_se
from .tasks import linear_gaussian as lg


class LinearRun(NamedTuple):
    """Everything a linear-task run produced before estimation."""

    config: SimConfig
    resolved: Resolved
    data: lg.LinearData
    populations: populations.Populations
    seconds: float


def _as_config(config: SimConfig | Mapping[str, Any]) -> SimConfig:
    if isinstance(config, SimConfig):
        return config
    if isinstance(config, Mapping):
        return SimConfig.from_dict(config)
    raise ConfigError(f"config must be a SimConfig or a mapping, got {type(config).__name__}")


def run_populations(config: SimConfig | Mapping[str, Any]) -> LinearRun:
    """Draw the datasets and train the teacher and student populations (no estimation).

    For notebooks and tests that need the particles themselves.
    """
    cfg = _as_config(config)
    res = resolve(cfg)
    st, nm = res.static, res.numeric
    if st.task != "linear_gaussian":
        raise ConfigError(f"task.name {st.task!r} is not available in this version of kdsim; "
                          "use 'linear_gaussian'")
    root = streams.root_key(cfg.seed)
    datasets = np.arange(st.num_datasets)
    particles = np.arange(st.num_particles)
    data = lg.make_data(root, datasets, n=st.n, d=st.d, k=st.k, rank=st.rank,
                        full_student=st.full_student, noise=nm.noise,
                        input_scale=nm.input_scale, input_decay=nm.input_decay,
                        signal_decay=nm.signal_decay)
    t0 = time.perf_counter()
    pops = populations.run_linear(root, st, nm, data, datasets, particles)
    return LinearRun(cfg, res, data, pops, time.perf_counter() - t0)


def simulate(config: SimConfig | Mapping[str, Any]) -> Result:
    """Run one simulation and estimate every quantity of the theory.

    Args:
      config: a :class:`SimConfig` or a (partial) mapping accepted by ``SimConfig.from_dict``.
    Returns:
      a :class:`Result` with ``per_dataset`` (one row per dataset), ``summary``,
      ``datasets``, ``config`` and ``notes``.
    """
    t0 = time.perf_counter()
    run = run_populations(config)
    per_dataset, notes = linear_columns(run)
    summary = summarize(per_dataset, seed=run.config.seed)
    notes = list(run.resolved.warnings) + notes + summary_notes(per_dataset)
    st = run.resolved.static
    meta = {
        "engine_seconds": run.seconds,
        "total_seconds": time.perf_counter() - t0,
        "particle_steps": st.num_datasets * st.num_particles * (st.teacher_steps + st.student_steps),
        "resolved": {"static": st._asdict(), "numeric": _numeric_dict(run.resolved),
                     "bound_divergence": run.resolved.bound_divergence,
                     "cgf": run.resolved.cgf},
    }
    datasets = {"X": run.data.X, "Y": run.data.Y, "W_star": run.data.W_star}
    return Result(config=run.config, per_dataset=per_dataset, summary=summary,
                  datasets=datasets, notes=notes, meta=meta)


def _numeric_dict(res: Resolved) -> dict[str, Any]:
    out = {}
    for k, v in res.numeric._asdict().items():
        out[k] = v._asdict() if hasattr(v, "_asdict") else v
    return out


def linear_columns(run: LinearRun) -> tuple[pd.DataFrame, list[str]]:
    """Per-dataset columns of the linear task (API.md) and the notes explaining them."""
    st, nm = run.resolved.static, run.resolved.numeric
    data, pops = run.data, run.populations
    E, k, d, r = st.num_datasets, st.k, st.d, st.rank
    notes: list[str] = []
    cols: dict[str, np.ndarray] = {"dataset": np.arange(E)}

    # ---- numerical blow-ups: counted, and excluded with their pairs from every estimate
    cols["diverged_T"] = pops.diverged_T.sum(axis=1)
    cols["diverged_S"] = pops.diverged_S.sum(axis=1)
    ok = ~pops.diverged_T & ~pops.diverged_S
    if (~ok).any():
        bad = np.flatnonzero((~ok).any(axis=1))
        notes.append(
            f"DIVERGED: {int(pops.diverged_T.sum())} teacher and {int(pops.diverged_S.sum())} "
            f"student particles blew up (non-finite) in datasets {bad.tolist()}; their pairs "
            "are excluded from every estimate. Reduce the step size.")

    W_T = pops.teacher.astype(np.float64)
    W_S = pops.student
    g_T = lg.gap_np(W_T, data)
    g_S = lg.gap_np(W_S, data)

    # ---- closed forms (float64)
    ft = closed_form.finite_time(data, st, nm)
    sta = closed_form.stationary(data, st, nm)
    cols["gen_T_exact"], cols["gen_S_exact"] = closed_form.expected_gaps(ft, data)
    cols["gen_T_stationary"], cols["gen_S_stationary"] = closed_form.expected_gaps(sta, data)
    cols["kl_exact"] = closed_form.kl_parameter(ft, st.full_student)
    cols["kl_stationary"] = closed_form.kl_parameter(sta, st.full_student)
    if not st.full_student:
        notes.append(
            f"kl_exact, kl_stationary: +inf because the rank-{r} student (r < d = {d}) has a "
            "singular kernel; parameter-space bounds are vacuous, use the function-space ones.")
    G = st.n * data.Cxx                      # Gram of the evaluation (= training) inputs
    nu_p = nm.channel_noise
    cols["klpred_exact"] = closed_form.kl_predictive(ft, G, st.n, nu_p)
    cols["klpred_stationary"] = closed_form.kl_predictive(sta, G, st.n, nu_p)
    dec = closed_form.decomposition(ft, G, data.Pi, r)
    cols["klpred_convexity_exact"] = dec.total / (2.0 * nu_p**2)
    for name, value in dec._asdict().items():
        cols[f"decomp_{name}"] = value

    # ---- Monte Carlo, per dataset over the surviving pairs
    mc = {name: np.full(E, np.nan) for name in (
        "gen_T", "gen_T_se", "gen_S", "gen_S_se", "klpred_convexity", "klpred_convexity_se",
        *[f"decomp_{n}_mc" for n in closed_form.Decomposition._fields],
        *[f"decomp_{n}_mc_se" for n in closed_form.Decomposition._fields])}
    for e in range(E):
        keep = ok[e]
        if keep.sum() < 2:
            continue
        mc["gen_T"][e], mc["gen_T_se"][e] = mean_se(g_T[e, keep])
        mc["gen_S"][e], mc["gen_S_se"][e] = mean_se(g_S[e, keep])
        conv = predictive.convexity_bound(W_S[e, keep], W_T[e, keep], G[e], nu_p)
        mc["klpred_convexity"][e], mc["klpred_convexity_se"][e] = conv
        values, ses = predictive.decomposition(W_S[e, keep], W_T[e, keep], G[e], data.Pi[e], r)
        for name in closed_form.Decomposition._fields:
            mc[f"decomp_{name}_mc"][e] = getattr(values, name)
            mc[f"decomp_{name}_mc_se"][e] = getattr(ses, name)
    empty = np.flatnonzero(ok.sum(axis=1) < 2)
    if empty.size:
        notes.append(f"Monte Carlo columns are NaN in datasets {empty.tolist()}: fewer than two "
                     "pairs survived (diverged chains).")
    cols.update(mc)

    order = ["dataset", "gen_T", "gen_T_se", "gen_S", "gen_S_se", "gen_T_exact", "gen_S_exact",
             "gen_T_stationary", "gen_S_stationary", "kl_exact", "kl_stationary",
             "klpred_exact", "klpred_stationary", "klpred_convexity", "klpred_convexity_se",
             "klpred_convexity_exact"]
    for name in closed_form.Decomposition._fields:
        order += [f"decomp_{name}", f"decomp_{name}_mc", f"decomp_{name}_mc_se"]
    order += ["diverged_T", "diverged_S"]
    return pd.DataFrame({c: cols[c] for c in order}), notes


def summary_notes(per_dataset: pd.DataFrame) -> list[str]:
    """Name every column that holds NaN or inf, so nothing non-finite passes silently."""
    notes = []
    for col in per_dataset.columns:
        v = per_dataset[col].to_numpy(dtype=np.float64)
        n_nan, n_inf = int(np.isnan(v).sum()), int(np.isinf(v).sum())
        if n_nan:
            notes.append(f"{col}: NaN in {n_nan} of {len(v)} datasets")
        if n_inf:
            notes.append(f"{col}: infinite in {n_inf} of {len(v)} datasets")
    return notes
