"""Figures. matplotlib is imported here and nowhere else in kdsim."""

from __future__ import annotations

import os

import numpy as np

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


def _truth(df, prefix=""):
    """The student's true gap per dataset: closed form if there is one, else Monte Carlo."""
    base = "gen_S_F" if prefix else "gen_S"
    if base + "_exact" in df:
        return df[base + "_exact"].to_numpy(float), "exact"
    return df[base].to_numpy(float), "Monte Carlo"


def bound_space(df) -> str:
    """``""`` to draw the parameter-space bounds, ``"F_"`` for the function-space ones
    (when no parameter-space bound is finite: rank-r or narrower students)."""
    finite = any(np.isfinite(df[b].to_numpy(float)).any() for b in BOUND_STYLE if b in df)
    has_f = any(("F_" + b) in df for b in BOUND_STYLE)
    return "F_" if (not finite and has_f) else ""


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
    if "kl_girsanov" in df and np.isfinite(df["kl_girsanov"].to_numpy(float)).any():
        _errorbar(ax, x, df, "kl_girsanov", "Girsanov path bound", "C6", "d")
    ax.set_yscale("log")
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel("nats")
    ax.set_title(r"Distillation divergences $KL(Q\,\|\,P)$")
    ax.legend(fontsize=7)
    if "kl_exact" in df and np.isinf(df["kl_exact"]).all():
        ax.text(0.02, 0.02, r"$KL_D = +\infty$ (rank-$r$ student)", transform=ax.transAxes, fontsize=8)


def _panel_decomposition(ax, df, x):
    # closed form where there is one (linear task), else the Monte Carlo terms
    kind = "exact" if "decomp_bias" in df else "Monte Carlo"
    col = (lambda t: f"decomp_{t}") if kind == "exact" else (lambda t: f"decomp_{t}_mc")
    terms = [t for t in ("bias", "subspace", "rank", "variance")
             if col(t) in df and np.isfinite(df[col(t)].to_numpy(float)).all()]
    bottom = np.zeros_like(x)
    for i, t in enumerate(terms):
        v = np.clip(df[col(t)].to_numpy(float), 0.0, None)
        ax.bar(x, v, bottom=bottom, color=f"C{i}", label=t)
        bottom = bottom + v
    ax.set_xlabel("dataset $e$")
    ax.set_ylabel(r"$E\,\|F_S - F_T\|_F^2$ on the training inputs")
    ax.set_title(f"Decomposition of the convexity bound ({kind})")
    if terms:
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    else:
        ax.text(0.05, 0.5, "no decomposition for this channel\n(categorical predictions)",
                transform=ax.transAxes)


def _panel_bounds(ax, df, x):
    prefix = bound_space(df)
    gen = "gen_S_F" if prefix else "gen_S"
    sym = r"\mathrm{gen}^F_S" if prefix else r"\mathrm{gen}_S"
    truth, kind = _truth(df, prefix)
    se = df[gen + "_se"].to_numpy(float) if kind == "Monte Carlo" else None
    ax.errorbar(x, truth, yerr=None if se is None else Z95 * se, fmt="s", color="k", ms=5,
                capsize=2, label=rf"true ${sym}(D)$ ({kind})", zorder=5)
    if gen in df and kind == "exact":
        _errorbar(ax, x, df, gen, rf"${sym}(D)$ Monte Carlo (95% CI)", "0.5", ".", 0.15)
    shown = []
    offsets = np.linspace(-0.3, 0.3, len(BOUND_STYLE))
    for (name, (label, marker, color)), off in zip(BOUND_STYLE.items(), offsets):
        name, label = prefix + name, ("F-" + label if prefix else label)
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
    ax.set_ylabel(rf"bound on ${sym}(D)$")
    ax.set_title(("Function-space bounds (no finite parameter-space KL)" if prefix else "Bounds")
                 + " beside the true student gap, per dataset")
    ax.legend(fontsize=7, ncol=2)


def _panel_average(ax, result):
    summary = result.summary
    prefix = bound_space(result.per_dataset)
    gen = "gen_S_F" if prefix else "gen_S"
    truth_col = gen + "_exact" if gen + "_exact" in summary.index else gen
    names = [n for n in BOUND_STYLE
             if prefix + n in summary.index and np.isfinite(summary.loc[prefix + n, "mean"])]
    rows = [truth_col] + names
    y = np.arange(len(rows))[::-1]
    for yi, name in zip(y, rows):
        key = name if name == truth_col else prefix + name
        m, lo, hi = (summary.loc[key, c] for c in ("mean", "ci_low", "ci_high"))
        if name == truth_col:
            label, marker, color = (r"true $\mathrm{gen}_S$", "s", "k")
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
    ax.set_title("Averaged over datasets" + (" (function space)" if prefix else ""))


def plot_result(result, path: str | os.PathLike[str] | None = None):
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
    if cfg.task.name == "linear_gaussian":
        rank = cfg.student.rank if cfg.student.rank is not None else cfg.task.d
        arch = f"k={cfg.task.k}, r={rank}"
    else:
        arch = f"widths {cfg.teacher.model.width} -> {cfg.student.model.width}"
    task = (f"pool {cfg.task.source}" if cfg.task.name == "pool" else f"{cfg.task.name}, d={cfg.task.d}")
    if cfg.task.name != "linear_gaussian":
        arch = " -> ".join(f"{m.kind} " + (f"{m.channels} ch" if m.kind == "cnn" else f"width {m.width}")
                           for m in (cfg.teacher.model, cfg.student.model))
    fig.suptitle(f"kdsim: {task}, n={cfg.task.n}, {arch}, "
                 rf"$\alpha$={cfg.student.alpha:g}, $\nu_T$={cfg.student.teacher_noise:g}, "
                 rf"$\tau$={cfg.student.temperature:g}; "
                 f"{cfg.num_datasets} datasets x {cfg.num_particles} particles")
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _mean_ci(sub, col, by):
    g = sub.groupby(by)[col]
    mean = g.mean()
    se = g.std(ddof=1) / np.sqrt(g.count())
    return mean.index.to_numpy(), mean.to_numpy(float), (Z95 * se).to_numpy(float)


def _is_numeric(values) -> bool:
    try:
        np.asarray(values, float)
        return True
    except (TypeError, ValueError):
        return False


def plot_sweep(table, out_dir: str | os.PathLike[str], max_panels: int = 6) -> list[str]:
    """For each swept field: the true student gap (95% CI band over datasets) and every
    bound, averaged over datasets, against the field's values; one panel per combination
    of the other swept fields. Writes ``sweep_<field>.png`` into ``out_dir``; returns paths."""
    plt = _pyplot()
    cols = list(table.columns)
    fields = cols[: cols.index("point")]
    paths = []
    for f in fields:
        others = [g for g in fields if g != f]
        groups = list(table.groupby(others)) if others else [((), table)]
        groups = groups[:max_panels]
        fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2),
                                 constrained_layout=True, squeeze=False)
        for ax, (key, sub) in zip(axes[0], groups):
            prefix = bound_space(sub)
            gen = "gen_S_F" if prefix else "gen_S"
            truth = gen + "_exact" if gen + "_exact" in sub else gen
            x, m, ci = _mean_ci(sub, truth, f)
            numeric = _is_numeric(x)
            xs = np.asarray(x, float) if numeric else np.arange(len(x))
            ax.plot(xs, m, "k-s", label=rf"true ${'gen^F_S' if prefix else 'gen_S'}$")
            ax.fill_between(xs, m - ci, m + ci, color="0.8", zorder=0)
            for name, (label, marker, color) in BOUND_STYLE.items():
                col = prefix + name
                if col not in sub or not np.isfinite(sub[col].to_numpy(float)).any():
                    continue
                _, mb, cb = _mean_ci(sub, col, f)
                ax.plot(xs, mb, "-" + marker, color=color, mfc="none" if "lower" in name else color,
                        label=("F-" if prefix else "") + label)
                ax.fill_between(xs, mb - cb, mb + cb, color=color, alpha=0.12)
            if not numeric:
                ax.set_xticks(xs, [str(v) for v in x])
            elif np.all(xs > 0) and xs.max() / xs.min() >= 10:
                ax.set_xscale("log")
                ax.set_xticks(xs, [f"{v:g}" for v in xs])
                ax.minorticks_off()
            ys = np.concatenate([line.get_ydata() for line in ax.get_lines()])
            ys = ys[np.isfinite(ys)]
            if ys.size and np.all(ys > 0) and ys.max() / ys.min() >= 30:
                ax.set_yscale("log")
            elif ys.size and ys.max() > 30 * max(np.median(np.abs(m)), 1e-12):
                ax.set_yscale("symlog", linthresh=max(np.median(np.abs(m)), 1e-12))
            ax.set_xlabel(f)
            ax.set_ylabel("gap / bound (dataset mean, 95% CI)")
            title = ", ".join(f"{o}={v}" for o, v in zip(others, key if isinstance(key, tuple) else (key,)))
            ax.set_title(title or f"bounds vs {f}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"kdsim sweep: bounds and true gap against {f}")
        path = os.path.join(os.fspath(out_dir), f"sweep_{f}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
