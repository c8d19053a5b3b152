"""The :class:`Result` of a simulation and its dataset-level summary.

:mod:`kdsim.io` and :mod:`kdsim.plots` work on a Result's fields and never import this
module; the Result's ``save`` and ``plot`` and :func:`load_result` call them.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import io, plots
from .config import SimConfig
from .stats import bootstrap_ci_columns

SUMMARY_COLUMNS = ("mean", "se", "ci_low", "ci_high", "n_datasets")


def summarize(per_dataset: pd.DataFrame, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Dataset-averaged quantities: mean, standard error, bootstrap CI.

    One row per numeric column of ``per_dataset`` (``dataset`` excepted). A column with
    a NaN in any dataset summarises to NaN (never averaged away: the notes name it);
    an infinite column summarises to its infinite mean with NaN spread. The bootstrap
    resamples the datasets once for all columns (:func:`kdsim.stats.bootstrap_ci_columns`).
    """
    rng = np.random.default_rng([seed, 0x5EED])
    rows, finite = {}, []
    for col in per_dataset.columns:
        if col in ("dataset", "supersample", "mask"):     # indices, not quantities
            continue
        v = per_dataset[col].to_numpy(dtype=np.float64, na_value=np.nan)
        n = v.size
        if np.isnan(v).any():
            rows[col] = (np.nan, np.nan, np.nan, np.nan, n)
        elif np.isinf(v).any():
            rows[col] = (float(v.mean()), np.nan, np.nan, np.nan, n)
        else:
            se = v.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
            rows[col] = (float(v.mean()), float(se), np.nan, np.nan, n)
            finite.append(col)
    if finite:      # every finite column's CI from one shared set of resamples
        values = per_dataset[finite].to_numpy(dtype=np.float64)
        lo, hi = bootstrap_ci_columns(values, rng, level)
        for col, a, b in zip(finite, lo, hi):
            rows[col] = rows[col][:2] + (float(a), float(b)) + rows[col][4:]
    out = pd.DataFrame.from_dict(rows, orient="index", columns=list(SUMMARY_COLUMNS))
    out["n_datasets"] = out["n_datasets"].astype(np.int64)
    out.index.name = "quantity"
    return out


@dataclass
class Result:
    """Everything one ``simulate`` call produced.

    Attributes:
      config: the :class:`SimConfig` that was run.
      per_dataset: one row per dataset (columns in API.md); ``dataset`` indexes ``datasets``.
      summary: dataset-averaged quantities (mean, se, 95% bootstrap CI).
      datasets: ``{"X": (E, n, d), "Y": (E, n, k), "W_star": (k, d)}`` NumPy arrays.
      notes: every NaN/inf column with its reason, every failed assumption, every warning.
      meta: timings, versions, resolved defaults.
      pooled: bounds on the dataset-averaged gap (K_n = E_D KL_D, E_D Lambda_D): value,
        truth, tightness, valid.
    """

    config: SimConfig
    per_dataset: pd.DataFrame
    summary: pd.DataFrame
    datasets: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    pooled: pd.DataFrame = field(default_factory=pd.DataFrame)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write ``path/result.json`` and ``path/result.npz`` (no pickle). Returns path."""
        return io.save_result(self, path)

    def plot(self, path: str | os.PathLike[str] | None = None):
        """Draw the result (see :func:`kdsim.plots.plot_result`); save to ``path`` if given."""
        return plots.plot_result(self, path)

    def table(self, quantities: list[str] | None = None) -> pd.DataFrame:
        """The summary restricted to ``quantities`` (default: the headline ones)."""
        if quantities is None:
            quantities = [q for q in HEADLINE if q in self.summary.index]
        return self.summary.loc[quantities]

    def _repr_html_(self) -> str:
        cfg = self.config
        head = (f"<b>kdsim Result</b>: task <code>{cfg.task.name}</code>, "
                f"{cfg.num_datasets} datasets x {cfg.num_particles} particles, seed {cfg.seed}")
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (head + self.table().to_html(float_format=lambda x: f"{x:.4g}")
                + (f"<details><summary>{len(self.notes)} notes</summary><ul>{notes}</ul></details>"
                   if self.notes else ""))

    def __repr__(self) -> str:
        cfg = self.config
        return (f"Result(task={cfg.task.name!r}, datasets={cfg.num_datasets}, "
                f"particles={cfg.num_particles}, columns={len(self.per_dataset.columns)}, "
                f"notes={len(self.notes)})")


def load_result(path: str | os.PathLike[str]) -> Result:
    """Load a folder written by :meth:`Result.save` (JSON + npz, no pickle); verifies the
    schema, the npz checksum and the config hash (:class:`kdsim.ResultFileError`)."""
    return Result(**io.read_result(path))


HEADLINE = [
    "gen_T", "gen_T_exact", "gen_S", "gen_S_exact", "gen_T_01", "gen_S_01",
    "gen_S_scratch", "gen_S_scratch_01", "kl_exact", "kl_stationary",
    "klpred_exact", "klpred_convexity", "klpred_convexity_exact",
    "decomp_bias", "decomp_subspace", "decomp_rank", "decomp_variance",
    "B0_upper", "B1_upper", "B2_lower", "B3_upper",
    "gen_S_F", "F_B0_upper", "F_B1_upper", "diverged_T", "diverged_S",
]


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}g}"
        return str(v)
    head = [str(df.index.name or "")] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [fmt(v) for v in row.to_numpy()]) + " |")
    return "\n".join(lines)
