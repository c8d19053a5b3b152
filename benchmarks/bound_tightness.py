"""How tight and how valid is each bound, across regimes?

Sweeps the sample size n (log grid), the inverse temperature gamma, the distillation
weight alpha, the student's rank (linear) and width (MLP), the teacher's flatness (input
scale c), the teacher channel noise nu_T and the temperature tau, and writes

- ``benchmarks/results/bound_tightness.md``: for each regime the true student gap, each
  bound, its slack, its slack relative to B0's, its validity rate over datasets, and
  which bound is tightest;
- PNG figures in ``benchmarks/results/``: bounds against the true gap across n (log-log,
  95% CI bands), slack against alpha, the tightness radius rho0 against the teacher's
  flatness, the four-term decomposition against the rank (stacked);
- real data (pool tasks, SPEC §9 "Data"; needs ``pip install "kdsim[data]"``):
  ``benchmarks/results/bound_tightness_real.md`` and ``real_data_bounds.png``: on the
  digits pool, the student's width, alpha and n (MLP teacher); on MNIST-1D, a CNN
  teacher distilled into MLP students of several widths. Run them alone with
  ``--only digits_width digits_alpha digits_n mnist1d_cnn``.
- "KD bounds vs generic bounds" (a section of ``bound_tightness.md``, or of
  ``bound_tightness_real.md`` when only real regimes run; ``kd_vs_generic.csv``, the long
  table; ``kd_vs_generic.png``, over the compression regimes): every point's pooled KD
  upper bounds (parameter and function space, B0_proj for rank-r students) beside the
  generic ones -- the trajectory rows of the same run and the CMI rows of a supersample
  run of the same regime (``--cmi``: with ``--quick`` every synthetic regime and the
  real compression ones, otherwise every regime; regression losses clipped at ``LOSS_CLIP``) -- each with its truth
  on its own loss, the ratio bound / truth, and the tightest valid bound named.

Every sweep point is stored (``--store``, default ``runs/bound_tightness``) the moment it
finishes, so an interrupted run resumes where it stopped.

    python benchmarks/bound_tightness.py --quick   # reduced grid, < 20 min on 2 CPU cores
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
from kdsim.sweep import load_point, read_manifest

HERE = os.path.dirname(os.path.abspath(__file__))
UPPER = ["B0_upper", "B1_upper", "B3_upper"]
REAL = ("digits_width", "digits_alpha", "digits_n", "mnist1d_cnn")
LOWER = ["B0_lower", "B2_lower"]
LOSS_CLIP = 1.0
# the compression regimes: the student cannot represent the teacher (rank, width, a CNN
# teacher distilled into MLP students); the figure "KD bounds vs generic bounds" is over them
COMPRESSION = ("rank", "width", "digits_width", "mnist1d_cnn")
# KD rows of res.pooled compared with the generic ones (upper bounds only)
KD_ROWS = ["B0_upper", "B1_upper", "B3_upper", "F_B0_upper", "F_B1_upper", "F_B3_upper",
           "B0_proj_upper"]
TRAJ_ROWS = ["kd_split_upper", "incoherence_upper", "bayes_stability_upper"]
CMI_ROWS = ["fcmi_upper", "ecmi_upper", "ldcmi_upper", "ldcmi_fast_upper", "ecmi_kl_upper",
            "ldcmi_kl_upper", "ldcmi_interpolating"]


def regimes(quick: bool) -> dict[str, tuple[dict, dict]]:
    """name -> (base config, grid)."""
    E, P, T = (8, 128, 500) if quick else (32, 512, 2000)
    Em, Pm, Tm = (4, 32, 300) if quick else (16, 64, 2000)
    # loss_clip: the generic (trajectory, CMI) bounds need a loss in [0, B]; it changes no
    # KD row, only adds the generic rows on the squared loss clipped at B
    lin = {"num_datasets": E, "num_particles": P, "teacher": {"num_steps": T},
           "student": {"alpha": 0.3}, "estimators": {"loss_clip": LOSS_CLIP}}
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
        "width": ({**mlp, "task": {**mlp["task"], "name": "mlp_regression"},
                   "estimators": {"loss_clip": LOSS_CLIP}},
                  {"student.model.width": g([8, 64], [4, 8, 16, 32, 64])}),
        "tau": ({**mlp, "task": {**mlp["task"], "name": "mlp_classification"},
                 "student": {"model": {"width": 64}, "alpha": 0.2}},
                {"student.temperature": g([1.0, 4.0], [0.5, 1.0, 2.0, 4.0])}),
        **real_regimes(quick),
    }


def real_regimes(quick: bool) -> dict[str, tuple[dict, dict]]:
    """Pool tasks: mu uniform on the pool, exact population risks (no test-set noise).

    Digits: MLP teacher of width 32; a student of width 32 has the teacher's structure
    (Girsanov, parameter-space bounds), a narrower one gets the function-space bounds.
    MNIST-1D: a 1D CNN teacher (vmapped convolutions are slow on CPU: kept small).
    """
    E, P, T = (4, 32, 300) if quick else (16, 64, 2000)
    Ec, Pc, Tc = (2, 16, 150) if quick else (8, 64, 1000)
    g = (lambda q, f: q if quick else f)
    digits = {"num_datasets": E, "num_particles": P,
              "task": {"name": "pool", "source": "digits", "n": 128},
              "teacher": {"num_steps": T, "step_size": 5e-3, "model": {"width": 32}},
              "student": {"alpha": 0.3, "temperature": 2.0, "model": {"width": 8}},
              "estimators": {"power_iterations": 10, "hutchinson_probes": 8}}
    mnist1d = {"num_datasets": Ec, "num_particles": Pc,
               "task": {"name": "pool", "source": "mnist1d", "n": 128},
               "teacher": {"num_steps": Tc, "step_size": 1e-2,
                           "model": {"kind": "cnn", "channels": 4, "kernel_size": 5}},
               "student": {"alpha": 0.3, "temperature": 2.0},
               "estimators": {"power_iterations": 10, "hutchinson_probes": 8, "curvature_points": 4}}
    return {
        "digits_width": (digits, {"student.model.width": g([8, 32], [4, 8, 16, 32])}),
        "digits_alpha": (digits, {"student.alpha": g([0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0])}),
        "digits_n": (digits, {"task.n": g([64, 256], [32, 64, 128, 256, 512])}),
        "mnist1d_cnn": (mnist1d, {"student.model.width": g([8, 32], [8, 16, 32, 64])}),
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


def fig_real(tables, path):
    """Real data: the true student gap and the upper bounds per point, one panel a regime
    (parameter-space bounds where the student has the teacher's structure, else the
    function-space ones; dataset means, 95% CI)."""
    plt = _pyplot()
    names = [n for n in REAL if n in tables]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), constrained_layout=True,
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        table = tables[name]
        field = next(c for c in table.columns if c not in ("point", "dataset"))
        xs = sorted(table[field].unique())
        pos = np.arange(len(xs))
        series = {}
        for i, v in enumerate(xs):
            sub = table[table[field] == v]
            prefix = bound_space(sub)
            for col, label in ([(prefix and "gen_S_F" or "gen_S", "true gap")]
                               + [(prefix + b, b.replace("_upper", "")) for b in UPPER]):
                if col in sub and np.isfinite(sub[col]).any():
                    vals = sub[col].dropna()
                    ci = 1.96 * vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0
                    series.setdefault(label, []).append((i, vals.mean(), ci, prefix))
        for j, (label, pts) in enumerate(series.items()):
            i, m, ci, pre = map(list, zip(*pts))
            style = dict(color="k", marker="s") if label == "true gap" else \
                dict(color=BOUND_STYLE[label + "_upper"][2], marker=BOUND_STYLE[label + "_upper"][1])
            ax.errorbar(np.array(i) + 0.04 * (j - 1), m, yerr=ci, fmt="-", capsize=3, label=label, **style)
        spaces = ["F" if (bound_space(table[table[field] == v]) == "F_") else "param" for v in xs]
        ax.set_xticks(pos, [f"{v:g}\n({s})" for v, s in zip(xs, spaces)])
        ax.set_yscale("log")          # gaps and bounds here are positive (a non-positive one is not drawn)
        ax.set_xlabel(f"{field} (bound space)")
        ax.set_title(name.replace("_", " "))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("true gap, upper bounds (dataset mean)")
    fig.suptitle("Real data (pool tasks): upper bounds against the exact-risk student gap "
                 "(param: cross-entropy; F: categorical channel)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s leaves written over it (nested tables merged, not replaced)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def supersample_config(base: dict, quick: bool) -> dict:
    """The regime's base config as a supersample (CMI) run: S supersamples x 16 masks, few
    particles (the plug-in MI uses masks x particles samples per pair; `cmi_bias.md`);
    pool tasks get fewer (2 x 16 x 8 with --quick) to keep the quick grid short."""
    S, P = (4, 16) if quick else (8, 32)
    if base.get("task", {}).get("name") == "pool":   # pool tasks: vmapped CNNs / wide MLPs
        S, P = (2, 8) if quick else (4, 16)
    est = {"supersample": True, "masks": 16, "scratch": False}
    if base.get("task", {}).get("name", "linear") in ("linear", "mlp_regression"):
        est["loss_clip"] = LOSS_CLIP
    return deep_merge(base, {"num_datasets": S, "num_particles": P, "estimators": est})


def pooled_points(out: str) -> dict:
    """Swept value -> res.pooled of every finished point of the sweep stored in ``out``."""
    manifest = read_manifest(out)
    pooled = {}
    for p in manifest["points"]:
        folder = os.path.join(out, "points", f"{p['index']:05d}-{p['hash'][:12]}")
        res = load_point(folder, p["hash"])
        if res is not None:
            pooled[next(iter(p["values"].values()))] = res.pooled
    return pooled


def _usable(row: pd.Series) -> bool:
    """An upper bound that may be named tightest: finite, valid on its own truth, its
    assumption met (NaN: none stated), and a positive truth (the ratio is meaningful)."""
    assumption = row.get("assumption", np.nan)
    return (np.isfinite(row["value"]) and row["valid"] == 1.0 and np.isfinite(row["truth"])
            and row["truth"] > 0 and not (assumption == 0.0))


def tightest_valid(rows: pd.DataFrame) -> tuple[str, str, float]:
    """(bound, loss, ratio) of the usable upper bound of smallest value / truth, each on its
    own loss (ratios, not values, compare bounds on different losses); ("-", "", nan) if none.

    rows: a pooled-style table (index: bound; columns value, truth, valid, loss, optional
    assumption)."""
    best = ("-", "", np.inf)
    for name, row in rows.iterrows():
        if _usable(row) and row["value"] / row["truth"] < best[2]:
            best = (str(name), str(row["loss"]), float(row["value"] / row["truth"]))
    return best if np.isfinite(best[2]) else ("-", "", float("nan"))


def compare_point(regime: str, value, pooled: pd.DataFrame, cmi: pd.DataFrame | None) -> pd.DataFrame:
    """The long table of one point: every KD and generic upper bound with its truth on its
    own loss, the ratio bound / truth, validity and (generic) assumption; ``run`` names
    the run it comes from (the regime's run, or its supersample run for the CMI rows)."""
    parts = []
    for rows, names, run in ((pooled, KD_ROWS + TRAJ_ROWS, "regime"), (cmi, CMI_ROWS, "supersample")):
        if rows is None:
            continue
        sub = rows.loc[[n for n in names if n in rows.index]].copy()
        sub["run"] = run
        parts.append(sub)
    df = pd.concat(parts)
    if "assumption" not in df:
        df["assumption"] = np.nan
    df = df[["family", "loss", "value", "truth", "valid", "assumption", "run"]].astype(
        {"value": float, "truth": float, "valid": float, "assumption": float})
    df["ratio"] = np.where(df["truth"] > 0, df["value"] / df["truth"], np.nan)
    df.insert(0, "value_swept", value)
    df.insert(0, "regime", regime)
    return df.reset_index().rename(columns={"index": "bound"})


def _cell(row) -> str:
    """'value (ratio x)' with marks: * invalid on its truth, + assumption not met."""
    if not np.isfinite(row["value"]):
        return "inf" if np.isinf(row["value"]) else "-"
    mark = ("*" if row["valid"] == 0.0 else "") + ("+" if row["assumption"] == 0.0 else "")
    ratio = f"{row['ratio']:.3g}x" if np.isfinite(row["ratio"]) else "n/a"
    return f"{row['value']:.3g} ({ratio}){mark}"


def side_by_side(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (regime, value): the truths on each loss, every bound as 'value (ratio)',
    the tightest valid bound overall, among the KD rows and among the generic rows."""
    rows = []
    for (regime, value), g in long.groupby(["regime", "value_swept"], sort=False):
        row = {"regime": regime, "value": value}
        kd = g[g["family"] == "kd"]
        fs = kd["bound"].str.startswith("F_")
        row["KD truth"] = "; ".join(f"{lab}{t['truth'].iloc[0]:.3g} ({t['loss'].iloc[0]})"
                                    for lab, t in (("", kd[~fs]), ("F: ", kd[fs])) if len(t)) or "-"
        for run, label in (("regime", "traj truth"), ("supersample", "CMI truth")):
            gen = g[(g["family"] == "generic") & (g["run"] == run)]
            row[label] = f"{gen['truth'].iloc[0]:.3g} ({gen['loss'].iloc[0]})" if len(gen) else "-"
        for _, r in g.iterrows():
            if r["bound"] in ("B1_upper", "F_B1_upper", "F_B3_upper"):
                continue   # B1 is never below B0 (it relaxes the CGF); shown in the main table
            row[r["bound"]] = _cell(r)
        for fam, label in ((None, "tightest valid"), ("kd", "best KD"), ("generic", "best generic")):
            sub = g if fam is None else g[g["family"] == fam]
            name, loss, ratio = tightest_valid(sub.set_index("bound"))
            row[label] = f"{name} [{loss}] {ratio:.3g}x" if name != "-" else "-"
        rows.append(row)
    return pd.DataFrame(rows).fillna("-")


def fig_kd_vs_generic(long: pd.DataFrame, path: str) -> list[str]:
    """Ratio bound / truth (each on its own loss, log axis) against the swept student size,
    one panel a compression regime: the best KD bound, B0_proj, the KD split, the other
    trajectory bounds and the best CMI bound. Hollow markers: invalid on the truth or
    assumption not met (never named tightest)."""
    names = [n for n in COMPRESSION if n in set(long["regime"])]
    if not names:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.3 * len(names), 5.0), layout="constrained",
                             squeeze=False)
    series = [("KD: best of B0/B1/B3 (param or F)", "C0", "v",
               lambda g: g[g["bound"].isin(KD_ROWS[:6])]),
              ("KD: B0_proj (projected teacher)", "C2", "D", lambda g: g[g["bound"] == "B0_proj_upper"]),
              ("generic: KD split (trajectory)", "C3", "o", lambda g: g[g["bound"] == "kd_split_upper"]),
              ("generic: incoherence", "C1", "s", lambda g: g[g["bound"] == "incoherence_upper"]),
              ("generic: Bayes-stability", "C5", "P", lambda g: g[g["bound"] == "bayes_stability_upper"]),
              ("generic: best CMI (supersample run)", "C4", "^", lambda g: g[g["bound"].isin(CMI_ROWS)])]
    for ax, name in zip(axes[0], names):
        sub = long[long["regime"] == name]
        xs = list(dict.fromkeys(sub["value_swept"]))
        for label, color, marker, pick in series:
            pts = []
            for i, v in enumerate(xs):
                g = pick(sub[sub["value_swept"] == v])
                g = g[np.isfinite(g["ratio"]) & (g["ratio"] > 0)]
                if not len(g):
                    continue
                ok = g[[_usable(r) for _, r in g.iterrows()]]
                r = (ok if len(ok) else g).sort_values("ratio").iloc[0]
                pts.append((i, r["ratio"], len(ok) > 0))
            if not pts:
                continue
            i, y, ok = map(np.array, zip(*pts))
            ax.plot(i, y, "-", color=color, label=label, lw=1)
            ax.plot(i[ok], y[ok], marker, color=color, ls="none")
            ax.plot(i[~ok], y[~ok], marker, color=color, mfc="none", ls="none")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(3.0, color="0.5", lw=0.8, ls="--")
        ax.set_yscale("log")
        field = {"rank": "student rank r", "width": "student width",
                 "digits_width": "student width (digits)", "mnist1d_cnn": "MLP student width (CNN teacher)"}
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_xlabel(field.get(name, name))
        ax.set_title(name.replace("_", " "))
    axes[0][0].set_ylabel("bound / truth, own loss (1: exact; dashed: 3x)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:        # a series missing from the first panel (no B0_proj there)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("KD bounds vs generic bounds in the compression regimes "
                 "(hollow: invalid or assumption not met)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path)]


def vacuous(row) -> bool:
    """A bound at or above the largest value its loss can take: trivially true."""
    top = {"clipped": LOSS_CLIP, "01": 1.0}.get(row["loss"], np.inf)
    return bool(np.isfinite(row["value"]) and row["value"] >= top)


def regime_ranges(long: pd.DataFrame) -> pd.DataFrame:
    """Per regime, the min - max over its points of the best valid ratio in each group:
    the KD rows, the trajectory rows, the CMI rows."""
    groups = (("KD (param, F, proj)", KD_ROWS), ("trajectory (generic)", TRAJ_ROWS),
              ("CMI (generic)", CMI_ROWS))
    out = []
    for regime, g in long.groupby("regime", sort=False):
        row = {"regime": regime}
        for label, names in groups:
            best = [tightest_valid(p[p["bound"].isin(names)].set_index("bound"))
                    for _, p in g.groupby("value_swept", sort=False)]
            r = np.array([b[2] for b in best], float)
            r = r[np.isfinite(r)]
            used = sorted({b[0] for b in best if b[0] != "-"})
            row[label] = (f"{r.min():.3g} - {r.max():.3g}x ({', '.join(used)})" if len(r) else "-")
        out.append(row)
    return pd.DataFrame(out)


def kd_vs_generic_section(args, long: pd.DataFrame, figs: list[str]) -> list[str]:
    """The markdown section "KD bounds vs generic bounds"."""
    wide = side_by_side(long)
    summary_cols = ["regime", "value", "KD truth", "traj truth", "CMI truth", "best KD",
                    "best generic", "tightest valid"]
    bound_cols = [c for c in wide.columns if c not in summary_cols and (wide[c] != "-").any()]
    only = f" --only {' '.join(args.only)}" if args.only else ""
    lines = ["", "## KD bounds vs generic bounds", "",
             f"Reproduce: `python benchmarks/bound_tightness.py{' --quick' if args.quick else ''}"
             f"{only} --cmi {args.cmi}` (the long table of every row: `kd_vs_generic.csv`).", "",
             "Every upper bound of `res.pooled` (pooled bounds on the dataset-averaged gap: "
             "a KD row here is at least the mean of the per-dataset bounds in the tables above) "
             "with its truth **on the bound's own loss** "
             "(`loss`): the KD rows (B0/B1/B3 in parameter space, F_ in function space, "
             "B0_proj with the teacher projected on a rank-r student's subspace; an F_ row's "
             "truth is the noisy predictor's gap, `F:` in `KD truth`) bound the gap "
             "on the squared loss (regression) or the cross-entropy / categorical-channel loss "
             "(classification); the generic trajectory rows (kd_split, incoherence, "
             "Bayes-stability; same run) and the CMI rows (a supersample run of the same regime: "
             f"{'4' if args.quick else '8'} supersamples x 16 masks x {'16' if args.quick else '32'} "
             f"particles, pool tasks {'2' if args.quick else '4'} x 16 x {'8' if args.quick else '16'}"
             f"{', MNIST-1D at its first width only' if args.quick else ''}; its own truth: other "
             "datasets, fewer particles) bound the gap on the squared loss clipped to "
             f"[0, {LOSS_CLIP:g}] (`clipped`, regression) or the 0-1 loss (`01`, classification). "
             "A clipped or 0-1 gap is a different (smaller) number than the squared-loss gap, "
             "so bounds on different losses are compared by their ratio bound / truth, each "
             "on its own loss, never by value. `tightest valid`: the smallest ratio among the "
             "finite upper bounds that hold on their truth (`valid`) and whose assumption is met "
             "(incoherence and Bayes-stability treat the student's run alone: their assumption "
             "fails for alpha < 1, as the partner saw the same data); `best KD` / `best "
             "generic`: the same within one family. Cells: value (ratio); `*` the bound fails "
             "on its truth, `+` its assumption is not met; `inf`: no finite bound (the student "
             "has no parameter-space density w.r.t. the teacher's). Vacuous here means at or "
             "above the loss's range (B for clipped, 1 for 0-1); the squared and "
             "cross-entropy losses are unbounded, so only the ratio speaks for them. Caveats: a "
             "bound on the gap clipped at B says nothing of the squared loss above B (at n = 16 "
             "the clipped gap is under half the squared one), so a generic row winning on its "
             "ratio is not a tighter bound on the KD rows' quantity; the CMI rows' validity is "
             "judged on the supersample run's own truth with a standard error over only "
             f"{'2-4' if args.quick else '4-8'} supersamples, a weak check; the KD rows are "
             "judged on every dataset of the regime's run.", "",
             "### Tightest bound per point", "", markdown(wide[summary_cols].set_index("regime")), "",
             "### Every bound: value (bound / truth)", "",
             markdown(wide[["regime", "value"] + bound_cols].set_index("regime")), ""]
    # where the KD bounds lose, and what is vacuous: computed, not hand-written
    loses, vac = [], []
    for (regime, value), g in long.groupby(["regime", "value_swept"], sort=False):
        kd = tightest_valid(g[g["family"] == "kd"].set_index("bound"))
        gen = tightest_valid(g[g["family"] == "generic"].set_index("bound"))
        if np.isfinite(gen[2]) and (not np.isfinite(kd[2]) or gen[2] < kd[2]):
            loses.append(f"{regime} = {value:g}: {gen[0]} [{gen[1]}] {gen[2]:.4g}x vs "
                         + (f"{kd[0]} [{kd[1]}] {kd[2]:.4g}x" if np.isfinite(kd[2]) else "no valid KD bound"))
        v = [r["bound"] for _, r in g.iterrows() if vacuous(r)]
        if v:
            vac.append(f"{regime} = {value:g}: {', '.join(v)}")
    lines += ["### Per regime: range over its points of the best ratio bound / truth", "",
              "Within each group the tightest valid bound (assumption met) at each point; "
              "min - max over the regime's points (`-`: none valid and finite).", "",
              markdown(regime_ranges(long).set_index("regime")), ""]
    lines += ["### Where the KD bounds lose (best generic ratio below the best KD ratio)", ""]
    lines += [f"- {x}" for x in loses] or ["- nowhere in this grid"]
    lines += ["", "### Vacuous bounds (at or above the loss's range)", ""]
    lines += [f"- {x}" for x in vac] or ["- none"]
    lines += [""] + [f"![{f}]({f})" for f in figs]
    return lines


def stored_compute_seconds(store: str, names=None) -> float:
    """Sum of the run times recorded in the stored points (resumed runs read them back)."""
    import glob
    import json
    total = 0.0
    for path in glob.glob(os.path.join(store, "*", "points", "*", "result.json")):
        if names is not None and path[len(store):].strip(os.sep).split(os.sep)[0] not in names:
            continue
        with open(path) as fh:
            total += float(json.load(fh)["meta"].get("total_seconds", 0.0))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the reduced grid")
    ap.add_argument("--store", default=os.path.join(os.path.dirname(HERE), "runs", "bound_tightness"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--only", nargs="*", help="regimes to run (default: all)")
    ap.add_argument("--cmi", choices=("quick", "compression", "all", "none"), default=None,
                    help="regimes that also get a supersample run for the CMI rows: quick = "
                         "every synthetic regime and the real compression ones (default with "
                         "--quick), compression, all (default otherwise), none")
    args = ap.parse_args()
    args.cmi = args.cmi or ("quick" if args.quick else "all")
    os.makedirs(args.results, exist_ok=True)
    t0 = time.time()
    tables, summaries, longs = {}, [], []
    store = os.path.join(args.store, "quick" if args.quick else "full")
    for name, (base, grid) in regimes(args.quick).items():
        if args.only and name not in args.only:
            continue
        t = time.time()
        tables[name] = kdsim.sweep(base, grid, out=os.path.join(store, name))
        field = next(iter(grid))
        summaries.append(summarize_regime(name, tables[name], field))
        print(f"{name}: {len(grid[field])} points in {time.time() - t:.0f} s", flush=True)
        pooled = pooled_points(os.path.join(store, name))
        cmi = {}
        if args.cmi == "all" or (args.cmi in ("compression", "quick") and name in COMPRESSION) \
                or (args.cmi == "quick" and name not in REAL):
            t = time.time()
            # the CNN supersample run is the slowest part of --quick: its first point only
            ss_grid = {field: grid[field][:1]} if args.quick and name == "mnist1d_cnn" else grid
            kdsim.sweep(supersample_config(base, args.quick), ss_grid, out=os.path.join(store, name + "_cmi"))
            cmi = pooled_points(os.path.join(store, name + "_cmi"))
            print(f"{name} (supersample run): {len(ss_grid[field])} points in {time.time() - t:.0f} s",
                  flush=True)
        longs.extend(compare_point(name, v, pooled[v], cmi.get(v)) for v in grid[field])
    figs = {"n": ("bounds_vs_n.png", fig_n), "alpha": ("slack_vs_alpha.png", fig_alpha),
            "flatness": ("rho0_vs_flatness.png", fig_flatness), "rank": ("decomposition_vs_rank.png", fig_rank)}
    written = []
    for name, (fname, fn) in figs.items():
        if name in tables:
            fn(tables[name], os.path.join(args.results, fname))
            written.append(fname)
    synthetic = [s for s in summaries if s["regime"].iloc[0] not in REAL]
    real = [s for s in summaries if s["regime"].iloc[0] in REAL]
    long = pd.concat(longs, ignore_index=True)
    long.to_csv(os.path.join(args.results, "kd_vs_generic.csv"), index=False)
    kd_fig = fig_kd_vs_generic(long, os.path.join(args.results, "kd_vs_generic.png"))
    section = kd_vs_generic_section(args, long, kd_fig)
    if synthetic:
        names = [n for n in tables if n not in REAL]
        write_table(args, t0, tables, names, synthetic, written, store, "bound_tightness.md",
                    "# Bound tightness and validity across regimes", SYNTHETIC_TEXT, section)
    if real:
        names = [n for n in tables if n in REAL]
        fig_real(tables, os.path.join(args.results, "real_data_bounds.png"))
        write_table(args, t0, tables, names, real, ["real_data_bounds.png"], store,
                    "bound_tightness_real.md", "# Bound tightness on real data (pool tasks)", REAL_TEXT,
                    [] if synthetic else section)


SYNTHETIC_TEXT = (
    "Linear task: d = 8, k = 2, n = 64, alpha = 0.3 unless swept; truth = the exact "
    "finite-time gap; bounds use the exact KL and CGF. Rank-r students have an infinite "
    "parameter-space KL, so their rows report the function-space bounds (`space`). MLP "
    "rows: teacher width 64, Girsanov KL (same width) or function space (narrower), "
    "empirical CGF, Monte Carlo truth. ")
REAL_TEXT = (
    "Pool tasks (SPEC §9 \"Data\"): mu is uniform on the pool, each dataset n i.i.d. draws "
    "from it, and the population risk is the exact pool average, so the truth has Monte "
    "Carlo error over particles only (`true gen_S`: the cross-entropy gap `gen_S` in "
    "parameter space, the categorical-channel gap `gen_S_F` in function space). Digits (1,797 8x8 "
    "images, standardised): MLP teacher of width 32, n = 128, alpha = 0.3, tau = 2 unless "
    "swept; a student of width 32 shares the teacher's structure (Girsanov KL, parameter "
    "space), narrower ones get the function-space bounds (`space`). MNIST-1D (5,000 "
    "sequences of length 40): a 1D CNN teacher (4 channels, kernel 5) distilled into MLP "
    "students: function space only. Empirical CGF. ")
COMMON_TEXT = (
    "Slack = bound - true gap (upper) or true gap - bound (lower), dataset means; "
    "`slack/B0` is relative to the B0 (Donsker-Varadhan) slack; `valid` is the fraction of "
    "datasets where the bound holds (3 se); `tightest upper` is the smallest-slack upper "
    "bound valid on every dataset.")


def write_table(args, t0, tables, names, summaries, written, store, fname, title, text, extra=()):
    compute = stored_compute_seconds(store, names + [n + "_cmi" for n in names])
    summary = pd.concat(summaries, ignore_index=True).set_index(["regime", "value"])
    cols_main = ["space", "true gen_S"] + [c for b in UPPER + LOWER for c in (b, b + " slack")
                                           if c in summary] + ["tightest upper"]
    cols_rel = [c for b in UPPER for c in (b + " slack/B0",) if c in summary] + \
        [b + " valid" for b in UPPER + LOWER if b + " valid" in summary]
    only = "" if fname == "bound_tightness.md" else " --only " + " ".join(names)
    lines = [
        title, "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} on "
        f"{jax.devices()[0].platform}; kdsim {kdsim.io.kdsim_version()}; "
        f"{'quick' if args.quick else 'full'} grid; compute time of the "
        f"{sum(len(tables[n]['point'].unique()) for n in names)} "
        f"points and their supersample runs {compute:.0f} s (sum of the stored run times; this invocation "
        f"{time.time() - t0:.0f} s, finished points are read back from the store).", "",
        f"Reproduce: `python benchmarks/bound_tightness.py{' --quick' if args.quick else ''}{only}`.",
        "", text + COMMON_TEXT, "",
        "## Values and slack", "", markdown(summary[cols_main].reset_index(level=1)), "",
        "## Slack relative to B0, and validity rates", "",
        markdown(summary[cols_rel].reset_index(level=1)), "",
        "## Figures", ""] + [f"![{f}]({f})" for f in written] + list(extra)
    with open(os.path.join(args.results, fname), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
