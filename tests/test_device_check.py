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
    for P in (256, 1024):
        assert {("linear", P, "kdsim engine"), ("linear", P, "minimal JAX")} <= impls
    assert ("mlp_regression", 64, "kdsim engine") in impls and ("mlp_regression", 64, "minimal JAX") in impls
    assert all(r["rate"] > 0 for r in res["engines"])
    sims = {r["config"]: r for r in res["simulate"]}
    assert sims["256 datasets"]["datasets"] == 256
    for r in sims.values():
        assert STAGES <= set(r["timings"]) and all(v >= 0 for v in r["timings"].values())
        # the stages account for the simulate's time (tables include the summary)
        assert sum(r["timings"].values()) <= r["seconds"] * 1.05
    cols = {r["column"]: r for r in res["precision"]}
    assert {"gen_T", "gen_S", "B0_upper"} <= set(cols)
    # float32 and float64 runs differ (different arithmetic), but by well under a standard error
    assert all(math.isfinite(r["max_diff_over_se"]) for r in cols.values())
    assert 0 < cols["gen_S"]["max_diff_over_se"] < 1.0
    assert (tmp_path / "check.md").read_text().startswith("# Accelerator check")
