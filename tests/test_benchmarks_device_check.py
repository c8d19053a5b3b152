"""The accelerator check's script runs end to end (``--cpu``: tiny sizes on the CPU)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")
STAGES = {"engine", "closed_forms", "estimators", "bounds", "tables"}


def test_device_check_cpu_mode_records_every_part(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--cpu",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["machine"]["platform"] == "cpu" and res["machine"]["device"]
    impls = {(r["task"], r["particles"], r["impl"]) for r in res["engines"]}
    assert {("linear", 256, "kdsim engine"), ("linear", 256, "minimal JAX")} <= impls
    assert ("mlp_regression", 32, "kdsim engine") in impls and ("mlp_regression", 32, "minimal JAX") in impls
    assert all(r["rate"] > 0 for r in res["engines"])
    sims = {r["config"]: r for r in res["simulate"]}
    assert sims["256 datasets"]["datasets"] == 256
    for r in sims.values():
        assert STAGES <= set(r["timings"]) and all(v >= 0 for v in r["timings"].values())
        # the stages account for the simulate's time (tables include the summary)
        assert sum(r["timings"].values()) <= r["seconds"] * 1.05
    cols = {r["column"]: r for r in res["precision"]}
    assert {"gen_T", "gen_S", "B0_upper"} <= set(cols)
    # float32 and float64 engines draw different normal streams (the draw depends on the
    # dtype), so the runs differ; at these tiny sizes the size of the difference means
    # nothing (the GPU run's sizes are what the comparison is for)
    for name in ("gen_T", "gen_S", "B0_upper"):
        assert math.isfinite(cols[name]["max_diff_over_se"]) and cols[name]["max_abs_diff"] > 0
    assert (tmp_path / "check.md").read_text().startswith("# Accelerator check")
