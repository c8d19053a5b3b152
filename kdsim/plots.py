"""Figures. matplotlib is imported here and nowhere else in kdsim."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .result import Result

Z95 = 1.959963984540054


def _pyplot():
    import matplotlib
    if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _errorbar(ax, x, df, col, label, color, marker="o", offset=0.0):
    y = df[col].to_numpy(float)
    se_col = f"{col}_se"
    yerr = Z95 * df[se_col].to_numpy(float) if se_col in df else None
    ax.errorbar(x + offset, y, yerr=yerr, fmt=marker, ms=4, capsize=2, color=color, label=label)


def plot_result(result: "Result", path: str | os.PathLike[str] | None = None):
    """Per-dataset overview: gaps, divergences and the predictive decomposition.

    Monte Carlo values carry 95% error bars (1.96 se over particles); closed forms are
    open markers. Returns the matplotlib Figure; writes a PNG if ``path`` is given.
    """
    plt = _pyplot()
    df = result.per_dataset
    x = df["dataset"].to_numpy(float)
    cfg = result.config
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)

    ax = axes[0]
    _errorbar(ax, x, df, "gen_T", r"$\mathrm{gen}_T(D)$ Monte Carlo", "C0", offset=-0.1)
    _errorbar(ax, x, df, "gen_S", r"$\mathrm{gen}_S(D)$ Monte Carlo", "C1", offset=0.1)
    if "gen_T_exact" in df:
        ax.plot(x - 0.1, df["gen_T_exact"], "s", mfc="none", color="C0", label=r"$\mathrm{gen}_T(D)$ exact")
        ax.plot(x + 0.1, df["gen_S_exact"], "s", mfc="none", color="C1", label=r"$\mathrm{gen}_S(D)$ exact")
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel(r"generalization gap $E[L_\mu - \hat L_D]$")
    ax.set_title("Teacher and student gaps (95% CI)")
    ax.legend(fontsize=8)

    ax = axes[1]
    plotted = False
    for col, label, color, marker in (
            ("kl_exact", r"$KL_D$ (exact)", "C2", "^"),
            ("klpred_exact", r"$KL^{pred}_D$ (exact)", "C3", "v"),
            ("klpred_convexity_exact", r"convexity bound (exact)", "C4", "s")):
        if col in df:
            v = df[col].to_numpy(float)
            if np.isfinite(v).any():
                ax.plot(x, np.where(np.isfinite(v), v, np.nan), marker, mfc="none", color=color,
                        label=label)
                plotted = True
    if "klpred_convexity" in df:
        _errorbar(ax, x, df, "klpred_convexity", "convexity bound (Monte Carlo)", "C4", ".")
        plotted = True
    if plotted and (df.filter(like="kl").to_numpy(float) > 0).any():
        ax.set_yscale("log")
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel("nats")
    ax.set_title(r"Distillation divergences $KL(Q\,\|\,P)$")
    ax.legend(fontsize=8)

    ax = axes[2]
    terms = [t for t in ("bias", "subspace", "rank", "variance") if f"decomp_{t}" in df]
    bottom = np.zeros_like(x)
    for i, t in enumerate(terms):
        v = np.clip(df[f"decomp_{t}"].to_numpy(float), 0.0, None)
        ax.bar(x, v, bottom=bottom, color=f"C{i}", label=t)
        bottom = bottom + v
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel(r"$E\,\|(W_S - W_T) X_e^T\|_F^2$")
    ax.set_title("Decomposition (exact, finite time)")
    if terms:
        ax.legend(fontsize=8)

    rank = cfg.student.rank if cfg.student.rank is not None else cfg.task.d
    fig.suptitle(f"kdsim: {cfg.task.name}, d={cfg.task.d}, k={cfg.task.k}, n={cfg.task.n}, "
                 rf"r={rank}, $\alpha$={cfg.student.alpha:g}, "
                 f"{cfg.num_datasets} datasets x {cfg.num_particles} particles")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
