"""What kdsim does when things go wrong (a cross-cutting suite).

simulate() on random valid configs ends in a Result or one of kdsim's documented
errors (ConfigError, DivergenceError, MemoryBudgetError): never a linear-algebra
traceback and never finite garbage from runaway chains. Shapes are fixed and small (only
the task, the student's rank and the dtype change the compiled programs, which the
examples then share: numeric fields are traced); step sizes are drawn around the
stability limit (half of it up to a thousand times it), in float32 and float64.

Step sizes beyond the stability limit are refused before any chain runs, naming the
field, its value and the limit (simulate, CLI, sweeps); blow-ups that still happen are
detected, reported with the step, kept out of the estimates, and the computed run is
kept (DivergenceError.run, divergence.npz); singular closed forms give NaN with a reason.
"""

import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdsim
from kdsim import closed_form, evaluation, populations, streams
from kdsim import config as config_mod
from kdsim.cli import main as cli_main
from kdsim.config import ConfigError, SimConfig
from kdsim.memory import MemoryBudgetError
from kdsim.tasks import linear_gaussian as lg

from helpers import data_for

simulate_mod = importlib.import_module("kdsim.simulate")   # kdsim.simulate is the function


DOCUMENTED = (ConfigError, kdsim.DivergenceError, MemoryBudgetError)

# A float64 chain of any config here: |w| stays below sqrt(limit) ~ 1e6 times the prior
# scale (kdsim.langevin.escape_limit), so finite garbage of 1e100 cannot reach a column.
FACTORS = [0.3, 0.85, 0.95, 1.0, 1.05, 1.5, 4.0, 30.0, 1e3]


@st.composite
def configs(draw):
    task = draw(st.sampled_from(["linear_gaussian"] * 4 + ["mlp_regression"]))
    d, n = 4, 32
    gamma = draw(st.sampled_from([None, 0.5, 20.0, 400.0]))
    prior = draw(st.sampled_from([1.0, 0.3, 3.0]))
    base = SimConfig.from_dict({"task": {"name": task, "d": d, "n": n, "k": 2}})
    g = gamma if gamma is not None else config_mod.default_gamma(base.task)
    if task == "linear_gaussian":
        # around the pre-data (Marchenko--Pastur) estimate of the stability limit: the
        # exact limit of the drawn data lies on either side of it
        scale = 2.0 / config_mod.linear_curvature_estimate(base.task, g, prior)
    else:
        scale = 1e-2
    h = draw(st.sampled_from(FACTORS)) * scale
    student_h = draw(st.sampled_from([None, h, 0.5 * h, 3 * h]))
    cfg = {
        "task": {"name": task, "d": d, "n": n, "k": 2, "n_test": 64},
        "teacher": {"gamma": gamma, "prior_scale": prior, "step_size": h,
                    "num_steps": 40, "model": {"width": 4}},
        "student": {"alpha": draw(st.sampled_from([0.0, 0.5, 1.0])),
                    "rank": draw(st.sampled_from([None, 1])) if task == "linear_gaussian" else None,
                    "teacher_noise": draw(st.sampled_from([0.0, 0.5])),
                    "langevin": {"step_size": student_h, "num_steps": 10},
                    "model": {"width": 4}},
        "estimators": {"power_iterations": 5, "hutchinson_probes": 4, "curvature_points": 1,
                       "channel_draws": 1, "scratch": False},
        "num_datasets": 2, "num_particles": 8,
        # the MLP engine in float32 only: each MLP dtype costs a 15 s compilation here
        "dtype": draw(st.sampled_from(["float32", "float64"] if task == "linear_gaussian" else ["float32"])),
        "seed": draw(st.integers(0, 3)),
    }
    return cfg


@settings(max_examples=16, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_simulate_gives_a_result_or_a_documented_error(cfg):
    try:
        res = kdsim.simulate(cfg, progress=False)
    except DOCUMENTED as err:
        message = str(err)
        assert message and "\n" not in message
        return
    assert isinstance(res.per_dataset, pd.DataFrame) and len(res.per_dataset) == 2
    # every non-finite column is named in the notes, with a reason somewhere
    for col in res.per_dataset.columns:
        v = res.per_dataset[col].to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(v).all():
            assert any(col in note for note in res.notes), (col, res.notes)
    # no runaway chain feeds the estimates: the gaps are of the prior's order, not 1e100
    gaps = res.per_dataset[["gen_T", "gen_S"]].to_numpy(np.float64)
    assert np.all(np.isnan(gaps) | (np.abs(gaps) < 1e12)), gaps


# ---------------------------------------------------------------------------------------
# the three runs of issue 19, the stability limit, and runaway chains

ISSUE = {"dtype": "float64", "task": {"d": 4, "n": 32}, "teacher": {"gamma": 20.0, "num_steps": 200}}


def _limit(cfg: SimConfig) -> float:
    """2 / lambda_max(gamma Cxx + I/s0^2) over the datasets, from the raw inputs X."""
    X = data_for(cfg).X
    Cxx = np.einsum("eni,enj->eij", X, X) / X.shape[1]
    A = cfg.teacher.gamma * Cxx + np.eye(X.shape[-1]) / cfg.teacher.prior_scale**2
    return float((2.0 / np.linalg.eigvalsh(A)[:, -1]).min())


@pytest.mark.parametrize("h", [1.0, 0.15, 0.3])
def test_issue_runs_end_in_a_clear_error_naming_field_value_and_limit(h, capsys):
    cfg = SimConfig.from_dict(ISSUE).replace({"teacher.step_size": h})
    limit = _limit(cfg)
    with pytest.raises(ConfigError) as err:
        kdsim.simulate(cfg, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"teacher.step_size = {h:.4g} is beyond the stability limit")
    assert f"= {limit:.4g} (dataset" in msg and "\n" not in msg


def test_cli_prints_the_stability_error_as_one_line(tmp_path, capsys):
    path = tmp_path / "hot.toml"
    path.write_text(SimConfig.from_dict(ISSUE).replace({"teacher.step_size": 0.3}).to_toml())
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out"), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("kdsim: error: teacher.step_size = 0.3 is beyond the stability limit")


def test_step_size_close_to_the_limit_is_a_note_and_the_student_field_is_named():
    small = {**ISSUE, "teacher": {**ISSUE["teacher"], "num_steps": 5},
             "num_datasets": 2, "num_particles": 4}
    cfg = SimConfig.from_dict(small)
    limit = _limit(cfg)
    run = kdsim.run_populations(cfg.replace({"teacher.step_size": 0.95 * limit}), progress=False)
    notes = [w for w in run.resolved.warnings if "of the stability limit" in w]
    assert len(notes) == 2                      # the teacher and the inheriting student
    assert notes[0].startswith(f"teacher.step_size = {0.95 * limit:.4g} is 95% of the stability limit")
    # variance ratio 2 / (2 - h lambda_max) at h lambda_max = 1.9
    assert "stationary variance is 20 times" in notes[0]
    assert notes[1].startswith("student.langevin.step_size (inherited from teacher.step_size)")
    quiet = kdsim.run_populations(cfg.replace({"teacher.step_size": 0.5 * limit}), progress=False)
    assert not any("stability" in w for w in quiet.resolved.warnings)
    with pytest.raises(ConfigError, match=r"^student\.langevin\.step_size = .* is beyond the stability"):
        kdsim.run_populations(cfg.replace({"student.langevin.step_size": 1.01 * limit}))


def test_engine_flags_finite_float64_runaways_and_freezes_them_inside_the_region():
    # bypass the pre-run check: the engine itself must not let a runaway chain through
    cfg = SimConfig.from_dict({**ISSUE, "num_datasets": 2, "num_particles": 8,
                               "student": {"langevin": {"num_steps": 5}}})
    limit = _limit(cfg)
    res = config_mod.resolve(cfg.replace({"teacher.step_size": 1.5 * limit}))
    data = data_for(cfg)
    pops = populations.run_linear(streams.root_key(cfg.seed), res, data, np.arange(2), np.arange(8))
    assert pops.diverged_T.all()
    assert np.isfinite(pops.teacher).all()
    D, gamma = cfg.task.k * cfg.task.d, cfg.teacher.gamma
    R = (pops.teacher.astype(np.float64) ** 2).sum(axis=(-1, -2))       # s0 = 1
    assert (R <= 1e8 * D * max(1.0, gamma)).all()
    assert (pops.diverged_step_T < 200).all()


def test_closed_forms_give_nan_with_a_reason_for_non_finite_or_singular_laws(monkeypatch):
    tiny = {"task": {"d": 3, "k": 2, "n": 12}, "teacher": {"num_steps": 30},
            "num_datasets": 3, "num_particles": 16}
    run = kdsim.run_populations(tiny, progress=False)
    original = closed_form.finite_time

    def broken(data, st, nm):
        laws = original(data, st, nm)
        S = laws.Sigma_T.copy()
        S[0] = np.inf        # overflowed laws
        S[1] = 0.0           # a singular covariance
        return laws._replace(Sigma_T=S)

    monkeypatch.setattr(closed_form, "finite_time", broken)
    per_dataset, _, notes = evaluation.evaluate(run)
    assert np.isnan(per_dataset["kl_exact"][:2]).all() and np.isfinite(per_dataset["kl_exact"][2])
    assert any(n.startswith("kl_exact: NaN in datasets [0, 1]") for n in notes)
    assert np.isnan(per_dataset["klpred_exact"][0]) and np.isfinite(per_dataset["klpred_exact"][2])
    # the last dataset is untouched: the same value as an unbroken evaluation
    monkeypatch.setattr(closed_form, "finite_time", original)
    clean, _, _ = evaluation.evaluate(run)
    assert per_dataset["kl_exact"][2] == clean["kl_exact"][2]


def test_a_sweep_point_beyond_the_limit_is_named():
    base = {**ISSUE, "num_datasets": 2, "num_particles": 4}
    with pytest.raises(ConfigError, match=r"^sweep point 0 \{'teacher.step_size': 0.3\}: "
                                          r"teacher.step_size = 0.3 is beyond the stability limit"):
        kdsim.sweep(base, {"teacher.step_size": [0.3]}, progress=False)




TINY = {"task": {"d": 3, "k": 2, "n": 12}, "teacher": {"num_steps": 60},
        "student": {"langevin": {"num_steps": 40}}, "num_datasets": 2, "num_particles": 16}


# A linear step size beyond the stability limit is refused before any chain runs
# (tests/test_robustness.py), so blow-ups are provoked on the MLP task.
HOT_MLP = {"task": {"name": "mlp_regression", "d": 3, "k": 2, "n": 12, "n_test": 64},
           "teacher": {"num_steps": 30, "step_size": 10.0, "model": {"width": 4}},
           "student": {"langevin": {"num_steps": 10}, "model": {"width": 4}},
           "num_datasets": 2, "num_particles": 16}


def test_step_size_ten_times_too_large_fails_clearly_from_the_cli(tmp_path):
    cfg = tmp_path / "hot.toml"
    cfg.write_text(SimConfig.from_dict(HOT_MLP).to_toml())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "kdsim", "run", str(cfg), "--out", str(out), "--no-plot"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"})
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert err.startswith("kdsim: error: 32 of 32 teacher chains diverged (100%, the first at step ")
    assert "reduce teacher.step_size (now 10)" in err
    assert "nan" not in proc.stdout.lower()
    record = np.load(out / "divergence.npz")
    assert record["diverged_T"].all() and (record["diverged_step_T"] >= 0).all()


def _with_diverged(run, e, idx):
    diverged = run.populations.diverged_T.copy()
    diverged[e, idx] = True
    steps = run.populations.diverged_step_T.copy()
    steps[e, idx] = 7
    return run._replace(populations=run.populations._replace(diverged_T=diverged, diverged_step_T=steps))


def test_divergence_error_keeps_the_computed_run():
    with pytest.raises(kdsim.DivergenceError) as err:
        kdsim.simulate(HOT_MLP)
    pops = err.value.run.populations
    assert pops.diverged_T.all()
    for leaf in jax.tree_util.tree_leaves(pops.teacher):   # frozen at the last healthy state
        assert np.isfinite(leaf).all()


def test_diverged_pairs_are_dropped_loudly_and_too_many_fail():
    run = kdsim.run_populations(TINY)
    hit = _with_diverged(run, 0, [1, 4, 5])
    per_dataset, _, notes = evaluation.evaluate(hit)
    assert per_dataset["diverged_T"].tolist() == [3, 0]
    assert any(n.startswith("DIVERGED: 3 teacher and 0 student particles") for n in notes)
    keep = np.setdiff1d(np.arange(16), [1, 4, 5])
    g_T = lg.gap_np(run.populations.teacher.astype(np.float64), run.data)
    assert per_dataset["gen_T"][0] == pytest.approx(g_T[0, keep].mean(), rel=1e-12)
    assert per_dataset["gen_T"][1] == pytest.approx(g_T[1].mean(), rel=1e-12)
    for col in ("gen_T", "gen_S", "kl_gaussian_diag", "B1_upper"):
        assert np.isfinite(per_dataset[col]).all(), col
    simulate_mod.check_divergence(hit)                       # 3 of 32 < 10%... is 9.4%: passes
    worse = _with_diverged(hit, 1, [0])                      # 4 of 32 = 12.5% > 10%
    with pytest.raises(kdsim.DivergenceError, match="4 of 32 teacher chains diverged .*the first at step 7"):
        simulate_mod.check_divergence(worse)
    lenient = worse._replace(config=worse.config.replace({"max_diverged_fraction": 0.5}))
    simulate_mod.check_divergence(lenient)


def test_a_dataset_left_with_too_few_pairs_is_nan_with_a_reason():
    run = _with_diverged(kdsim.run_populations(TINY), 1, list(range(14)))
    per_dataset, _, notes = evaluation.evaluate(run)
    assert np.isnan(per_dataset["gen_T"][1]) and np.isfinite(per_dataset["gen_T"][0])
    assert any("fewer than 4 pairs survived" in n and "[1]" in n for n in notes)
    assert any("NaN in some datasets" in n and "gen_T (1 of 2)" in n
               for n in simulate_mod.summary_notes(per_dataset))


def test_sweep_names_the_point_that_diverged(tmp_path):
    with pytest.raises(kdsim.DivergenceError, match=r"sweep point 1 \{'teacher.step_size'"):
        kdsim.sweep(HOT_MLP, {"teacher.step_size": [1e-4, 10.0]}, out=str(tmp_path / "s"))
    table = kdsim.load_sweep(tmp_path / "s")                # the finished point is kept
    assert table["point"].unique().tolist() == [0]
    assert isinstance(table, pd.DataFrame)
