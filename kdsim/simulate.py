"""``kdsim.simulate(config) -> Result``: train the populations, estimate, evaluate.

A pure function of a validated config: the same config and seed give bit-identical
results on the same machine.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple

import numpy as np
import pandas as pd

from . import populations, streams
from .config import ConfigError, Resolved, SimConfig, resolve
from .evaluation import linear_columns
from .result import Result, summarize
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
    if res.bound_divergence == "girsanov" and st.full_student:
        raise ConfigError("estimators.bound_divergence = 'girsanov' is not available in this "
                          "version of kdsim for the linear task; use 'exact'")
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
    per_dataset, pooled, notes = linear_columns(run)
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
                  datasets=datasets, notes=notes, meta=meta, pooled=pooled)


def _numeric_dict(res: Resolved) -> dict[str, Any]:
    out = {}
    for k, v in res.numeric._asdict().items():
        out[k] = v._asdict() if hasattr(v, "_asdict") else v
    return out


def summary_notes(per_dataset: pd.DataFrame) -> list[str]:
    """Name every column that holds NaN or inf, so nothing non-finite passes silently."""
    notes = []
    for col in per_dataset.columns:
        v = per_dataset[col].to_numpy(dtype=np.float64, na_value=np.nan)
        n_nan, n_inf = int(np.isnan(v).sum()), int(np.isinf(v).sum())
        if n_nan:
            notes.append(f"{col}: NaN in {n_nan} of {len(v)} datasets")
        if n_inf:
            notes.append(f"{col}: infinite in {n_inf} of {len(v)} datasets")
    return notes
