"""How much does a population's arithmetic change with its layout? (SPEC §11)

A population split over devices, chunks of particles or processes draws exactly the same
random numbers (they are keyed by global dataset and particle index), but XLA compiles
each batch shape on its own and may pick other matmul / reduction kernels, so the
float32 states differ in the last bits, and the difference grows slowly along the run.
This script measures it: for the linear task and the MLP tasks (autodiff gradients,
library matmuls), the population is trained whole on one device, in particle chunks,
and spread over 4 CPU devices (a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``); it reports the largest state
difference relative to the states' scale, and for float64 runs the largest relative
difference of the estimates.

Run: ``python benchmarks/layout_differences.py`` (about two minutes on 2 cores; writes
``benchmarks/results/layout_differences.md``). The test suite asserts the tolerances
(float32 states 2e-5 of their scale, float64 estimates 1e-10 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np

import kdsim

HERE = os.path.dirname(os.path.abspath(__file__))

LINEAR = {"task": {"d": 8, "k": 2, "n": 64}, "teacher": {"num_steps": 400},
          "student": {"alpha": 0.3, "teacher_noise": 0.3}, "num_datasets": 4, "num_particles": 64}
MLP_R = {"task": {"name": "mlp_regression", "d": 8, "k": 2, "n": 64, "n_test": 64},
         "teacher": {"num_steps": 200, "model": {"width": 32}},
         "student": {"alpha": 0.3, "model": {"width": 32}}, "num_datasets": 4, "num_particles": 16}
MLP_C = {**MLP_R, "task": {**MLP_R["task"], "name": "mlp_classification", "num_classes": 3}}
CASES = [("linear", LINEAR), ("linear, float64", {**LINEAR, "dtype": "float64"}),
         ("mlp_regression", MLP_R), ("mlp_classification", MLP_C),
         ("mlp_classification, float64", {**MLP_C, "dtype": "float64"})]
ESTIMATES = ("gen_T", "gen_S", "kl_girsanov", "B0_upper", "F_B0_upper")

_CHILD = r"""
import json, sys, numpy as np, jax, kdsim
flat = lambda t: np.concatenate([np.reshape(x, np.shape(x)[:2] + (-1,)) for x in jax.tree_util.tree_leaves(t)], -1)
for i, cfg in enumerate(json.loads(sys.argv[1])):
    run = kdsim.run_populations(cfg)
    res = kdsim.simulate(cfg)
    np.savez(f"{sys.argv[2]}/case_{i}.npz", T=flat(run.populations.teacher), S=flat(run.populations.student),
             **{c: res.per_dataset[c].to_numpy(float) for c in json.loads(sys.argv[3]) if c in res.per_dataset})
"""


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.reshape(x, np.shape(x)[:2] + (-1,)) for x in jax.tree_util.tree_leaves(tree)], -1)


def state_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


def estimate_difference(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return float("nan")
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-300)))


def main() -> int:
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_PLATFORMS": "cpu", "CI": "1"}
        subprocess.run([sys.executable, "-c", _CHILD, json.dumps([c for _, c in CASES]), tmp,
                        json.dumps(ESTIMATES)], env=env, check=True)
        for i, (name, cfg) in enumerate(CASES):
            one = kdsim.run_populations(cfg, progress=False).populations
            chunked = kdsim.run_populations({**cfg, "particle_chunk": 5}, progress=False).populations
            four = np.load(os.path.join(tmp, f"case_{i}.npz"))
            row = {"case": name, "steps": cfg["teacher"]["num_steps"],
                   "chunks of 5: teacher": state_difference(_flat(chunked.teacher), _flat(one.teacher)),
                   "chunks of 5: student": state_difference(_flat(chunked.student), _flat(one.student)),
                   "4 devices: teacher": state_difference(four["T"], _flat(one.teacher)),
                   "4 devices: student": state_difference(four["S"], _flat(one.student))}
            if cfg.get("dtype") == "float64":
                single = kdsim.simulate(cfg, progress=False).per_dataset
                row["4 devices: estimates (max rel.)"] = max(
                    estimate_difference(four[c], single[c].to_numpy(float)) for c in ESTIMATES if c in four)
            rows.append(row)
            print(row, flush=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["# Layout differences (SPEC §11)", "",
             f"Measured on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
             "with `python benchmarks/layout_differences.py`.", "",
             "Largest state difference relative to the states' scale (`max |a - b| / max(1, max |b|)`) "
             "between the single-device run and the same population in particle chunks or spread "
             "over 4 CPU devices: the same random draws, other batch shapes. Float64 rows also give "
             "the largest relative difference of the estimates "
             f"({', '.join(ESTIMATES)}). 0 means bit-identical.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c, float('nan')):.2g}" if isinstance(r.get(c), float)
                                       else str(r.get(c, "")) for c in cols) + " |")
    path = os.path.join(HERE, "results", "layout_differences.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
