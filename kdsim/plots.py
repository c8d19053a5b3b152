"""Figures. matplotlib is imported here and nowhere else in kdsim."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .result import Result

Z95 = 1.959963984540054

# bound -> (label, marker, colour); upper bounds point down onto the truth, lower ones up
BOUND_STYLE = {
    "B0_upper": (r"B0 (DV) upper", "v", "C0"),
    "B1_upper": (r"B1 sub-Gaussian upper", "v", "C1"),
    "B3_upper": (r"B3 sharpness upper", "v", "C2"),
    "B0_lower": (r"B0 (DV) lower", "^", "C0"),
    "B2_lower": (r"B2 $\eta$-central lower", "^", "C3"),
}


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


def _truth(df):
    """The student's true gap per dataset: closed form if there is one, else Monte Carlo."""
    if "gen_S_exact" in df:
        return df["gen_S_exact"].to_numpy(float), "exact"
    return df["gen_S"].to_numpy(float), "Monte Carlo"


def _panel_gaps(ax, df, x):
    _errorbar(ax, x, df, "gen_T", r"$\mathrm{gen}_T(D)$ Monte Carlo", "C0", offset=-0.1)
    _errorbar(ax, x, df, "gen_S", r"$\mathrm{gen}_S(D)$ Monte Carlo", "C1", offset=0.1)
    if "gen_T_exact" in df:
        ax.plot(x - 0.1, df["gen_T_exact"], "s", mfc="none", color="C0", label=r"$\mathrm{gen}_T(D)$ exact")
        ax.plot(x + 0.1, df["gen_S_exact"], "s", mfc="none", color="C1", label=r"$\mathrm{gen}_S(D)$ exact")
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel(r"gap $E[L_\mu - \hat L_D]$")
    ax.set_title("Teacher and student gaps (95% CI)")
    ax.legend(fontsize=7)


def _panel_divergences(ax, df, x):
    for col, label, color, marker in (
            ("kl_exact", r"$KL_D$ exact", "C2", "^"),
            ("kl_gaussian_full", r"$KL_D$ Gaussian fit", "C5", "x"),
            ("klpred_exact", r"$KL^{pred}_D$ exact", "C3", "v"),
            ("klpred_convexity_exact", "convexity bound (exact)", "C4", "s")):
        if col in df:
            v = df[col].to_numpy(float)
            if np.isfinite(v).any():
                ax.plot(x, np.where(np.isfinite(v) & (v > 0), v, np.nan), marker, mfc="none",
                        color=color, label=label)
    if "klpred_convexity" in df:
        _errorbar(ax, x, df, "klpred_convexity", "convexity bound (Monte Carlo)", "C4", ".")
    ax.set_yscale("log")
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel("nats")
    ax.set_title(r"Distillation divergences $KL(Q\,\|\,P)$")
    ax.legend(fontsize=7)
    if "kl_exact" in df and np.isinf(df["kl_exact"]).all():
        ax.text(0.02, 0.02, r"$KL_D = +\infty$ (rank-$r$ student)", transform=ax.transAxes, fontsize=8)


def _panel_decomposition(ax, df, x):
    terms = [t for t in ("bias", "subspace", "rank", "variance") if f"decomp_{t}" in df]
    bottom = np.zeros_like(x)
    for i, t in enumerate(terms):
        v = np.clip(df[f"decomp_{t}"].to_numpy(float), 0.0, None)
        ax.bar(x, v, bottom=bottom, color=f"C{i}", label=t)
        bottom = bottom + v
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel(r"$E\,\|(W_S - W_T) X^T\|_F^2$")
    ax.set_title("Decomposition of the convexity bound (exact)")
    if terms:
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)


def _panel_bounds(ax, df, x):
    truth, kind = _truth(df)
    se = df["gen_S_se"].to_numpy(float) if kind == "Monte Carlo" else None
    ax.errorbar(x, truth, yerr=None if se is None else Z95 * se, fmt="s", color="k", ms=5,
                capsize=2, label=rf"true $\mathrm{{gen}}_S(D)$ ({kind})", zorder=5)
    if "gen_S" in df and kind == "exact":
        _errorbar(ax, x, df, "gen_S", r"$\mathrm{gen}_S(D)$ Monte Carlo (95% CI)", "0.5", ".", 0.15)
    shown = []
    offsets = np.linspace(-0.3, 0.3, len(BOUND_STYLE))
    for (name, (label, marker, color)), off in zip(BOUND_STYLE.items(), offsets):
        if name not in df:
            continue
        v = df[name].to_numpy(float)
        if not np.isfinite(v).any():
            continue
        ax.plot(x + off, v, marker, color=color, ms=6, mfc="none" if "lower" in name else color,
                label=label)
        shown.append(v[np.isfinite(v)])
    if shown:
        allv = np.concatenate(shown + [truth])
        scale = max(np.median(np.abs(truth)), 1e-12)
        if allv.max() - allv.min() > 30 * scale:
            ax.set_yscale("symlog", linthresh=scale)
    else:
        ax.text(0.02, 0.95, r"parameter-space bounds are $\pm\infty$ (infinite $KL_D$)",
                transform=ax.transAxes, va="top", fontsize=9)
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel(r"bound on $\mathrm{gen}_S(D)$")
    ax.set_title("Bounds beside the true student gap, per dataset")
    ax.legend(fontsize=7, ncol=2)


def _panel_average(ax, result):
    summary = result.summary
    truth_col = "gen_S_exact" if "gen_S_exact" in summary.index else "gen_S"
    names = [n for n in BOUND_STYLE if n in summary.index and np.isfinite(summary.loc[n, "mean"])]
    rows = [truth_col] + names
    y = np.arange(len(rows))[::-1]
    for yi, name in zip(y, rows):
        m, lo, hi = (summary.loc[name, c] for c in ("mean", "ci_low", "ci_high"))
        if name == truth_col:
            label, marker, color = (rf"true $\mathrm{{gen}}_S$", "s", "k")
        else:
            label, marker, color = BOUND_STYLE[name]
        xerr = None if not (np.isfinite(lo) and np.isfinite(hi)) else [[m - lo], [hi - m]]
        ax.errorbar([m], [yi], xerr=xerr, fmt=marker, color=color, capsize=3, ms=7)
    t = summary.loc[truth_col]
    if np.isfinite(t["ci_low"]):
        ax.axvspan(t["ci_low"], t["ci_high"], color="0.85", zorder=0)
    ax.set_yticks(y)
    ax.set_yticklabels([r"true $\mathrm{gen}_S$" if r == truth_col else BOUND_STYLE[r][0] for r in rows],
                       fontsize=8)
    ax.set_xlabel("dataset average (95% bootstrap CI)")
    ax.set_title("Averaged over datasets")


def plot_result(result: "Result", path: str | os.PathLike[str] | None = None):
    """Overview of one result: gaps, divergences, decomposition, and every bound beside
    the true student gap (per dataset and averaged).

    Monte Carlo values carry 95% error bars (1.96 se over particles); closed forms are
    open markers. Returns the matplotlib Figure; writes a PNG if ``path`` is given.
    """
    plt = _pyplot()
    df = result.per_dataset
    x = df["dataset"].to_numpy(float)
    cfg = result.config
    fig = plt.figure(figsize=(16, 9), constrained_layout=True)
    grid = fig.add_gridspec(2, 3)
    _panel_gaps(fig.add_subplot(grid[0, 0]), df, x)
    _panel_divergences(fig.add_subplot(grid[0, 1]), df, x)
    _panel_decomposition(fig.add_subplot(grid[0, 2]), df, x)
    _panel_bounds(fig.add_subplot(grid[1, :2]), df, x)
    _panel_average(fig.add_subplot(grid[1, 2]), result)
    rank = cfg.student.rank if cfg.student.rank is not None else cfg.task.d
    fig.suptitle(f"kdsim: {cfg.task.name}, d={cfg.task.d}, k={cfg.task.k}, n={cfg.task.n}, "
                 rf"r={rank}, $\alpha$={cfg.student.alpha:g}, $\nu_T$={cfg.student.teacher_noise:g}; "
                 f"{cfg.num_datasets} datasets x {cfg.num_particles} particles")
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
