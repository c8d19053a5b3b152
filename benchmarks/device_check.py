"""The accelerator check (issue 16): one short script, every number recorded with the
device it ran on (``jax.devices()``).

1. the linear engine at 2^16, 2^18 and 2^20 particles against BlackJAX (when installed)
   and the minimal hand-written kernels (``throughput.bench_linear``);
2. the MLP engine against a minimal vmapped ``jax.grad`` Langevin kernel
   (``throughput.bench_mlp``);
3. the default ``simulate`` with its stage breakdown (``Result.meta["timings"]``);
4. a 256-dataset ``simulate``;
5. float32 against float64: the same config in both, the change of every estimate in
   units of its standard error.

Results: ``benchmarks/results/device_check_<platform>.json`` and ``.md`` (or ``--out``).
``--cpu`` runs the same code paths at tiny sizes on the CPU (a test runs it), so the
script is known to work before a GPU is ever lent.

    bash benchmarks/device_check.sh           # on the GPU machine, under 5 minutes
    bash benchmarks/device_check.sh --cpu     # anywhere: 1-3 minutes on 2 busy cores, mostly compiling
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def sizes(cpu: bool) -> dict:
    if cpu:
        # tiny, and shapes shared where possible (every new shape is a compilation)
        small = {"num_datasets": 4, "num_particles": 32, "teacher": {"num_steps": 50},
                 "estimators": {"scratch": False}}
        # one MLP task: each costs a compilation of the engine and of the minimal kernel
        return dict(linear=[256], linear_steps=10, mlp=[32], mlp_steps=5, repeats=1,
                    mlp_tasks=("mlp_regression",),
                    simulate=small, warmup=False,
                    wide={"num_datasets": 256, "num_particles": 4, "teacher": {"num_steps": 10},
                          "estimators": {"scratch": False}},
                    precision=small)
    return dict(linear=[1 << 16, 1 << 18, 1 << 20], linear_steps=200, mlp=[1 << 12, 1 << 16],
                mlp_steps=100, repeats=2, simulate={}, warmup=True, wide={"num_datasets": 256},
                precision={"num_datasets": 64, "num_particles": 1024})


def simulate_row(name: str, cfg: dict, warmup: bool = True) -> dict:
    import kdsim
    if warmup:
        kdsim.simulate(cfg, progress=False)                # compile
    t0 = time.perf_counter()
    res = kdsim.simulate(cfg, progress=False)
    wall = time.perf_counter() - t0
    st = kdsim.config.resolve(res.config).static
    row = {"config": name, "overrides": cfg, "seconds": wall, "engine_s": res.meta["engine_seconds"],
           "evaluation_s": res.meta["total_seconds"] - res.meta["engine_seconds"],
           "timings": res.meta.get("timings", {}),
           "particle_steps": res.meta["particle_steps"],
           "datasets": st.num_datasets, "particles": st.num_particles}
    row["evaluation_over_engine"] = row["evaluation_s"] / row["engine_s"]
    print(f"  simulate {name}: {wall:.2f} s (engine {row['engine_s']:.2f} s, evaluation "
          f"{row['evaluation_s']:.2f} s); " + ", ".join(f"{k} {v:.2f}" for k, v in row["timings"].items()),
          flush=True)
    return row


def precision_rows(cfg: dict) -> list[dict]:
    """The same config in float32 and float64: the change of each estimate over its se."""
    import kdsim
    out = {}
    for dtype in ("float32", "float64"):
        out[dtype] = kdsim.simulate({**cfg, "dtype": dtype}, progress=False).per_dataset
    a, b = out["float32"], out["float64"]
    rows = []
    for col in ("gen_T", "gen_S", "kl_gaussian_full", "kl_girsanov", "klpred_convexity", "B0_upper",
                "B1_upper", "B2_lower", "B3_upper", "F_B0_upper"):
        if col not in a or col not in b:
            continue
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        diff = np.abs(x - y)
        se_col = b.get(col + "_se", b.get("gen_T_se"))
        over = diff / se_col.to_numpy(float)
        rows.append({"column": col, "max_abs_diff": float(np.nanmax(diff)),
                     "max_rel_diff": float(np.nanmax(diff / np.maximum(np.abs(y), 1e-300))),
                     "max_diff_over_se": float(np.nanmax(over)),
                     "se_of": col + "_se" if col + "_se" in b else "gen_T_se"})
        print(f"  float32 vs float64 {col}: max |diff| {rows[-1]['max_abs_diff']:.3g} "
              f"= {rows[-1]['max_diff_over_se']:.3g} se", flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Accelerator check ({m['device']}, {m['platform']})", "",
             f"JAX {m['jax']}, kdsim {m['kdsim']}, {m['date']}. Reproduce: "
             f"`bash benchmarks/device_check.sh {result['args']}` ({result['seconds']:.0f} s in all).", "",
             "## Engines (particle-steps per second; x minimal = ratio to the minimal kernel)", "",
             "| task | particles | steps | implementation | particle-steps/s | x minimal | compile + first (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["engines"]:
        lines.append(f"| {r['task']} | {r['particles']} | {r['steps']} | {r['impl']} | {r['rate']:.3g} | "
                     f"{r.get('ratio', float('nan')):.2f} | {r['compile_s']:.1f} |")
    names = ("engine", "closed_forms", "estimators", "bounds", "tables")
    lines += ["", "## Whole simulate and its stages (seconds)", "",
              "| config | datasets x particles | wall | evaluation / engine | " + " | ".join(names) + " |",
              "|---" * (4 + len(names)) + "|"]
    for r in result["simulate"]:
        t = r["timings"]
        lines.append(f"| {r['config']} | {r['datasets']} x {r['particles']} | {r['seconds']:.2f} | "
                     f"{r['evaluation_over_engine']:.0%} | "
                     + " | ".join(f"{t[k]:.2f}" if k in t else "–" for k in names) + " |")
    lines += ["", "## float32 against float64 (the same config and seed)", "",
              "The two engines draw different normal streams (a draw depends on its dtype), so "
              "the estimates differ by Monte Carlo error as well as by rounding: about sqrt(2) "
              "standard errors is expected; far more would mean float32 loses accuracy.", "",
              "| column | max abs diff | max rel diff | in standard errors |", "|---|---|---|---|"]
    for r in result["precision"]:
        lines.append(f"| {r['column']} | {r['max_abs_diff']:.3g} | {r['max_rel_diff']:.3g} | "
                     f"{r['max_diff_over_se']:.3g} ({r['se_of']}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the script's own test)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/device_check_<platform>.json)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import throughput as tp                  # the throughput benchmark's code paths
    plat = jax.devices()[0].platform
    if not args.cpu and plat != "gpu":
        print(f"no GPU found (jax.devices() = {jax.devices()}); run with --cpu for the tiny CPU check")
        return 2
    try:
        import blackjax  # noqa: F401
        have_blackjax = True
    except ImportError:
        have_blackjax = False
        print("BlackJAX not installed: its rows are skipped (pip install -r benchmarks/requirements.txt)")
    sz = sizes(args.cpu)
    print(f"accelerator check on {jax.devices()[0]}", flush=True)
    engines: list[dict] = []
    tp.bench_linear(sz["linear"], sz["linear_steps"], sz["repeats"], have_blackjax, engines)
    tp.bench_mlp(sz["mlp"], sz["mlp_steps"], sz["repeats"], have_blackjax, engines,
                 sz.get("mlp_tasks", ("mlp_regression", "mlp_classification")))
    for r in engines:
        r.pop("_printed", None)
    sims = [simulate_row("default", sz["simulate"], sz["warmup"]),
            simulate_row("256 datasets", sz["wide"], sz["warmup"])]
    precision = precision_rows(sz["precision"])
    result = {"machine": tp.machine(), "args": " ".join(sys.argv[1:] if argv is None else argv),
              "engines": engines, "simulate": sims, "precision": precision,
              "seconds": time.perf_counter() - t_start}
    out = args.out or os.path.join(HERE, "results", f"device_check_{'cpu' if args.cpu else plat}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    md = markdown(result)
    with open(out[:-5] + ".md", "w") as fh:
        fh.write(md)
    print("\n" + md + f"\nwritten {out} and {out[:-5]}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
