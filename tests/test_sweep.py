"""Sweeps: grid expansion, the durable store, resume after SIGKILL, no recompilation."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import kdsim
from kdsim import io, populations
import importlib

sweep_mod = importlib.import_module("kdsim.sweep")   # kdsim.sweep is the function
from kdsim.config import ConfigError

BASE = {"task": {"d": 3, "k": 2, "n": 16}, "teacher": {"num_steps": 40},
        "num_datasets": 2, "num_particles": 32}
GRID = {"student.alpha": [0.0, 0.5], "teacher.gamma": [20.0, 40.0]}


def test_grid_expansion_and_errors():
    pts = sweep_mod.expand_grid({"task.n": [8, 16], "student.alpha": [0.1, 0.2, 0.3]})
    assert len(pts) == 6 and pts[0] == {"task.n": 8, "student.alpha": 0.1}
    assert pts[1] == {"task.n": 8, "student.alpha": 0.2}
    with pytest.raises(ConfigError, match="unknown field 'task.nn' \\(did you mean 'task.n'\\?\\)"):
        sweep_mod.expand_grid({"task.nn": [1]})
    with pytest.raises(ConfigError, match="must be a non-empty list"):
        sweep_mod.expand_grid({"task.n": []})
    with pytest.raises(ConfigError, match="grid point .*student.alpha must be"):
        kdsim.sweep(BASE, {"student.alpha": [0.5, 2.0]})


@pytest.fixture(scope="module")
def reference():
    return kdsim.sweep(BASE, GRID)


def test_tidy_table(reference):
    t = reference
    assert list(t.columns[:4]) == ["student.alpha", "teacher.gamma", "point", "dataset"]
    assert len(t) == 4 * 2 and t["point"].nunique() == 4
    assert set(t["student.alpha"]) == {0.0, 0.5} and set(t["teacher.gamma"]) == {20.0, 40.0}
    assert np.isfinite(t["gen_S_exact"]).all()


def test_store_resume_and_no_recomputation(reference, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    first = kdsim.sweep(BASE, GRID, out=out)
    pd.testing.assert_frame_equal(first, reference, check_exact=True)
    calls = []
    real = sweep_mod.simulate
    monkeypatch.setattr(sweep_mod, "simulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = kdsim.sweep(BASE, GRID, out=out)
    assert calls == []                                   # nothing recomputed
    pd.testing.assert_frame_equal(again, reference, check_exact=True)
    pd.testing.assert_frame_equal(kdsim.load_sweep(out), reference, check_exact=True)
    # a corrupted point is detected, recomputed, never loaded
    point = sorted((out / "points").iterdir())[1]
    npz = point / io.NPZ_NAME
    npz.write_bytes(npz.read_bytes()[:100])
    assert kdsim.load_sweep(out).attrs["missing"] == [1]
    healed = kdsim.sweep(BASE, GRID, out=out)
    assert calls == [1]
    pd.testing.assert_frame_equal(healed, reference, check_exact=True)


def test_other_sweep_in_the_same_folder_is_refused(tmp_path):
    kdsim.sweep(BASE, {"student.alpha": [0.0]}, out=tmp_path / "s")
    with pytest.raises(kdsim.SweepError, match="holds a different sweep"):
        kdsim.sweep(BASE, {"student.alpha": [0.5]}, out=tmp_path / "s")


def test_numeric_fields_never_recompile_across_a_sweep():
    fns = [populations._linear_init, populations._linear_targets, populations._linear_segment]
    kdsim.sweep(BASE, {"student.alpha": [0.1]})
    before = [f._cache_size() for f in fns]
    kdsim.sweep(BASE, {"teacher.gamma": [15.0, 30.0], "student.alpha": [0.2, 0.7],
                       "student.teacher_noise": [0.0, 0.4], "teacher.step_size": [1e-3, 2e-3]})
    assert [f._cache_size() for f in fns] == before


def _sweep_file(tmp_path, grid):
    path = tmp_path / "sweep.toml"
    lines = ["[base]", "num_datasets = 2", "num_particles = 32", "[base.task]", "d = 3", "k = 2",
             "n = 16", "[base.teacher]", "num_steps = 40", "[grid]"]
    lines += [f'"{k}" = {list(v)}' for k, v in grid.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sigkill_then_rerun_gives_the_uninterrupted_table(tmp_path):
    grid = {"student.alpha": [0.0, 0.25, 0.5, 0.75, 1.0]}
    path = _sweep_file(tmp_path, grid)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdsim", "sweep", str(path), "--out", str(out), "--no-plot"]
    env = {**os.environ, "CI": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    points = out / "points"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [p for p in points.iterdir() if (p / io.JSON_NAME).exists()] if points.exists() else []
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before the kill: nothing was interrupted"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL                 # it died of the kill, not on its own
    finished = {p.name: (p / io.JSON_NAME).stat().st_mtime_ns for p in points.iterdir()
                if (p / io.JSON_NAME).exists()}
    assert 1 <= len(finished) < 5
    assert kdsim.load_sweep(out).attrs["missing"]         # the store really is incomplete
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name, mtime in finished.items():                   # finished points were not redone
        assert (points / name / io.JSON_NAME).stat().st_mtime_ns == mtime
    base, g = sweep_mod.load_sweep_file(path)
    pd.testing.assert_frame_equal(kdsim.load_sweep(out), kdsim.sweep(base, g), check_exact=True)


def test_repeated_sigkill_at_random_moments_resumes_to_the_same_table(tmp_path):
    """Three kills at random moments (start-up, compilation, mid-point, mid-save), each
    followed by a resume: the store ends bit-identical to an uninterrupted sweep."""
    grid = {"student.alpha": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]}
    path = _sweep_file(tmp_path, grid)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdsim", "sweep", str(path), "--out", str(out), "--no-plot"]
    env = {**os.environ, "CI": "1"}
    rng = np.random.default_rng(20261130)
    killed = 0
    for delay in rng.uniform(0.5, 9.0, size=3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            killed += proc.wait() == -signal.SIGKILL
    assert killed >= 1                                    # at least one run was interrupted
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    base, g = sweep_mod.load_sweep_file(path)
    pd.testing.assert_frame_equal(kdsim.load_sweep(out), kdsim.sweep(base, g), check_exact=True)


def test_cli_sweep_and_plot_write_figures(tmp_path):
    from kdsim.cli import main
    path = _sweep_file(tmp_path, {"task.n": [16, 32]})
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert (tmp_path / "o" / "sweep_task.n.png").stat().st_size > 10_000
    os.remove(tmp_path / "o" / "sweep_task.n.png")
    assert main(["plot", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "sweep_task.n.png").exists()
    assert main(["sweep", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "x")]) == 2


RAY_GRID = {"student.alpha": [0.0, 0.5, 1.0]}


@pytest.fixture(scope="module")
def local_ray():
    # only the Ray tests need Ray (the two-process JAX test in test_sharding.py runs without it)
    ray = pytest.importorskip("ray", reason='the Ray extra is installed by scripts/test.sh: '
                              'pip install "kdsim[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"CI": "1", "JAX_PLATFORMS": "cpu"}})
    yield
    ray.shutdown()


def test_ray_sweep_gives_the_serial_table(local_ray, tmp_path):
    from kdsim import ray_executor
    table = kdsim.sweep(BASE, RAY_GRID, out=str(tmp_path / "ray"), executor=ray_executor())
    serial = kdsim.sweep(BASE, RAY_GRID)
    pd.testing.assert_frame_equal(table, serial, check_exact=True)
    # the store is the ordinary one: a plain resume reads every point back
    pd.testing.assert_frame_equal(kdsim.load_sweep(tmp_path / "ray"), serial, check_exact=True)


def test_a_failing_ray_point_keeps_the_finished_ones(local_ray, tmp_path):
    from kdsim import ray_executor
    # the second point fails: its step size is beyond the data's stability limit
    hot = {"teacher.step_size": [1e-4, 50.0]}
    with pytest.raises(Exception, match="sweep point 1 .* beyond the stability limit"):
        kdsim.sweep(BASE, hot, out=str(tmp_path / "s"), executor=ray_executor())
    assert kdsim.load_sweep(tmp_path / "s")["point"].unique().tolist() == [0]
