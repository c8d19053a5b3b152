"""How tight and how valid is each bound, across regimes?

Sweeps the sample size n (log grid), the inverse temperature gamma, the distillation
weight alpha, the student's rank (linear) and width (MLP), the teacher's flatness (input
scale c), the teacher channel noise nu_T and the temperature tau, and writes

- ``benchmarks/results/bound_tightness.md``: for each regime the true student gap, each
  bound, its slack, its slack relative to B0's, its validity rate over datasets, and
  which bound is tightest;
- PNG figures in ``benchmarks/results/``: bounds against the true gap across n (log-log,
  95% CI bands), slack against alpha, the tightness radius rho0 against the teacher's
  flatness, the four-term decomposition against the rank (stacked).

Every sweep point is stored (``--store``, default ``runs/bound_tightness``) the moment it
finishes, so an interrupted run resumes where it stopped.

    python benchmarks/bound_tightness.py --quick   # reduced grid, < 15 min on 2 CPU cores
    python benchmarks/bound_tightness.py           # full grid: meant for a GPU (about an
                                                   # hour on one; many hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
import pandas as pd

import kdsim
from kdsim.plots import BOUND_STYLE, _pyplot, bound_space
from kdsim.result import markdown

HERE = os.path.dirname(os.path.abspath(__file__))
UPPER = ["B0_upper", "B1_upper", "B3_upper"]
LOWER = ["B0_lower", "B2_lower"]


def regimes(quick: bool) -> dict[str, tuple[dict, dict]]:
    """name -> (base config, grid)."""
    E, P, T = (8, 128, 500) if quick else (32, 512, 2000)
    Em, Pm, Tm = (4, 32, 300) if quick else (16, 64, 2000)
    lin = {"num_datasets": E, "num_particles": P, "teacher": {"num_steps": T},
           "student": {"alpha": 0.3}}
    mlp = {"num_datasets": Em, "num_particles": Pm, "teacher": {"num_steps": Tm},
           "task": {"n_test": 1024 if quick else 4096}}
    g = (lambda q, f: q if quick else f)
    return {
        "n": (lin, {"task.n": g([16, 32, 64, 128, 256], [16, 32, 64, 128, 256, 512, 1024, 4096])}),
        "gamma": (lin, {"teacher.gamma": g([32.0, 256.0, 1024.0], [16.0, 64.0, 256.0, 1024.0, 4096.0])}),
        "alpha": (lin, {"student.alpha": g([0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0])}),
        "nu_T": (lin, {"student.teacher_noise": g([0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 1.0, 2.0])}),
        "flatness": (lin, {"task.input_scale": g([0.25, 1.0, 4.0], [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])}),
        "rank": ({**lin, "task": {"d": 8, "k": 4}},
                 {"student.rank": g([1, 2, 4, 8], [1, 2, 3, 4, 6, 8])}),
        "width": ({**mlp, "task": {**mlp["task"], "name": "mlp_regression"}},
                  {"student.model.width": g([8, 64], [4, 8, 16, 32, 64])}),
        "tau": ({**mlp, "task": {**mlp["task"], "name": "mlp_classification"},
                 "student": {"model": {"width": 64}, "alpha": 0.2}},
                {"student.temperature": g([1.0, 4.0], [0.5, 1.0, 2.0, 4.0])}),
    }


def summarize_regime(name: str, table: pd.DataFrame, field: str) -> pd.DataFrame:
    """One row per point: true gap, every bound, slack, slack / B0's, validity, tightest."""
    rows = []
    for value, sub in table.groupby(field, sort=True):
        prefix = bound_space(sub)
        gen = "gen_S_F" if prefix else "gen_S"
        truth_col = gen + "_exact" if gen + "_exact" in sub else gen
        truth = sub[truth_col].mean()
        row = {"regime": name, "value": value, "space": "function" if prefix else "parameter",
               "true gen_S": truth}
        slack_b0 = (sub[prefix + "B0_upper"] - sub[truth_col]).mean()
        best, best_slack = None, np.inf
        for b in UPPER + LOWER:
            col = prefix + b
            if col not in sub or not np.isfinite(sub[col]).any():
                continue
            slack = (sub[col] - sub[truth_col]) if b in UPPER else (sub[truth_col] - sub[col])
            valid = sub[col + "_valid"].to_numpy(dtype=float, na_value=np.nan)
            row[b] = sub[col].mean()
            row[b + " slack"] = slack.mean()
            row[b + " valid"] = np.nanmean(valid) if np.isfinite(valid).any() else np.nan
            if b in UPPER:
                row[b + " slack/B0"] = slack.mean() / slack_b0 if slack_b0 > 0 else np.nan
                if row[b + " valid"] == 1.0 and slack.mean() < best_slack:
                    best, best_slack = b, slack.mean()
        row["tightest upper"] = best or "-"
        rows.append(row)
    return pd.DataFrame(rows)


def fig_n(table, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    g = table.groupby("task.n")
    x = np.array(sorted(table["task.n"].unique()), float)
    for col, label, style in [("gen_S_exact", r"true $\mathrm{gen}_S$", dict(color="k", marker="s"))] + \
            [(b, BOUND_STYLE[b][0], dict(color=BOUND_STYLE[b][2], marker=BOUND_STYLE[b][1])) for b in UPPER]:
        m = g[col].mean().to_numpy()
        ci = 1.96 * (g[col].std(ddof=1) / np.sqrt(g[col].count())).to_numpy()
        ax.plot(x, m, "-", label=label, **style)
        ax.fill_between(x, np.maximum(m - ci, 1e-12), m + ci, color=style["color"], alpha=0.15)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()
    ax.set_xlabel("training points n")
    ax.set_ylabel(r"upper bound on $\mathrm{gen}_S(D)$ (dataset mean, 95% CI)")
    ax.set_title("Bounds against the true student gap across n (linear task)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_alpha(table, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    x = np.array(sorted(table["student.alpha"].unique()))
    g = table.groupby("student.alpha")
    for b in UPPER + LOWER:
        slack = (table[b] - table["gen_S_exact"]) if b in UPPER else (table["gen_S_exact"] - table[b])
        gs = slack.groupby(table["student.alpha"])
        m, ci = gs.mean().to_numpy(), 1.96 * (gs.std(ddof=1) / np.sqrt(gs.count())).to_numpy()
        label, marker, color = BOUND_STYLE[b]
        ax.errorbar(x, m, yerr=ci, fmt="-" + marker, color=color, capsize=3, label=label,
                    mfc="none" if "lower" in b else color)
    del g
    # slack reaches 0 at alpha = 1 (the student is the teacher's law): symmetric log scale
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel(r"distillation weight $\alpha$ ($\alpha = 1$: no distillation)")
    ax.set_ylabel("slack (bound - true gap, dataset mean, 95% CI)")
    ax.set_title(r"Slack of each bound against $\alpha$ (linear task)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_flatness(table, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    g = table.groupby("task.input_scale")
    x = np.array(sorted(table["task.input_scale"].unique()))
    for col, label, color in (("rho0", r"tightness radius $\rho_0$", "C2"),
                              ("rho", r"teacher radius $\rho$", "C7")):
        m = g[col].mean().to_numpy()
        ci = 1.96 * (g[col].std(ddof=1) / np.sqrt(g[col].count())).to_numpy()
        ax.errorbar(x, m, yerr=ci, fmt="-o", color=color, capsize=3, label=label)
    curv = g["gap_curvature"].mean().to_numpy()
    ax2 = ax.twinx()
    ax2.plot(x, curv, "--", color="C3", label=r"gap curvature $S_D$")
    ax2.set_ylabel(r"$S_D$", color="C3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()
    ax.set_xlabel("input scale c (larger c: sharper teacher loss)")
    ax.set_ylabel("radius")
    ax.set_title(r"B3 beats B1 iff $\rho < \rho_0$: $\rho_0$ against the teacher's flatness")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_rank(table, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    g = table.groupby("student.rank")
    x = np.array(sorted(table["student.rank"].unique()))
    bottom = np.zeros(len(x))
    for i, t in enumerate(("bias", "subspace", "rank", "variance")):
        v = np.clip(g[f"decomp_{t}"].mean().to_numpy(), 0, None)
        ax.bar(x, v, bottom=bottom, color=f"C{i}", label=t, width=0.6)
        bottom += v
    ax.set_xlabel("student rank r (d = 8, k = 4)")
    ax.set_ylabel(r"$E\,\|(W_S - W_T) X^T\|_F^2$ (dataset mean)")
    ax.set_xticks(x)
    ax.set_title("Bias / subspace / rank / variance decomposition against the rank")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stored_compute_seconds(store: str) -> float:
    """Sum of the run times recorded in the stored points (resumed runs read them back)."""
    import glob
    import json
    total = 0.0
    for path in glob.glob(os.path.join(store, "*", "points", "*", "result.json")):
        with open(path) as fh:
            total += float(json.load(fh)["meta"].get("total_seconds", 0.0))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the reduced grid")
    ap.add_argument("--store", default=os.path.join(os.path.dirname(HERE), "runs", "bound_tightness"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--only", nargs="*", help="regimes to run (default: all)")
    args = ap.parse_args()
    os.makedirs(args.results, exist_ok=True)
    t0 = time.time()
    tables, summaries = {}, []
    store = os.path.join(args.store, "quick" if args.quick else "full")
    for name, (base, grid) in regimes(args.quick).items():
        if args.only and name not in args.only:
            continue
        t = time.time()
        tables[name] = kdsim.sweep(base, grid, out=os.path.join(store, name))
        field = next(iter(grid))
        summaries.append(summarize_regime(name, tables[name], field))
        print(f"{name}: {len(grid[field])} points in {time.time() - t:.0f} s", flush=True)
    compute = stored_compute_seconds(store)
    figs = {"n": ("bounds_vs_n.png", fig_n), "alpha": ("slack_vs_alpha.png", fig_alpha),
            "flatness": ("rho0_vs_flatness.png", fig_flatness), "rank": ("decomposition_vs_rank.png", fig_rank)}
    written = []
    for name, (fname, fn) in figs.items():
        if name in tables:
            fn(tables[name], os.path.join(args.results, fname))
            written.append(fname)
    summary = pd.concat(summaries, ignore_index=True).set_index(["regime", "value"])
    cols_main = ["space", "true gen_S"] + [c for b in UPPER + LOWER for c in (b, b + " slack")
                                           if c in summary] + ["tightest upper"]
    cols_rel = [c for b in UPPER for c in (b + " slack/B0",) if c in summary] + \
        [b + " valid" for b in UPPER + LOWER if b + " valid" in summary]
    lines = [
        "# Bound tightness and validity across regimes", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} on "
        f"{jax.devices()[0].platform}; kdsim {kdsim.io.kdsim_version()}; "
        f"{'quick' if args.quick else 'full'} grid; compute time of the {sum(len(t['point'].unique()) for t in tables.values())} "
        f"points {compute:.0f} s (sum of their stored run times; this invocation "
        f"{time.time() - t0:.0f} s, finished points are read back from the store).", "",
        f"Reproduce: `python benchmarks/bound_tightness.py{' --quick' if args.quick else ''}`.",
        "", "Linear task: d = 8, k = 2, n = 64, alpha = 0.3 unless swept; truth = the exact "
        "finite-time gap; bounds use the exact KL and CGF. Rank-r students have an infinite "
        "parameter-space KL, so their rows report the function-space bounds (`space`). MLP "
        "rows: teacher width 64, Girsanov KL (same width) or function space (narrower), "
        "empirical CGF, Monte Carlo truth. Slack = bound - true gap (upper) or true gap - "
        "bound (lower), dataset means; `slack/B0` is relative to the B0 (Donsker-Varadhan) "
        "slack; `valid` is the fraction of datasets where the bound holds (3 se); `tightest "
        "upper` is the smallest-slack upper bound valid on every dataset.", "",
        "## Values and slack", "", markdown(summary[cols_main].reset_index(level=1)), "",
        "## Slack relative to B0, and validity rates", "",
        markdown(summary[cols_rel].reset_index(level=1)), "",
        "## Figures", ""] + [f"![{f}]({f})" for f in written]
    with open(os.path.join(args.results, "bound_tightness.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
