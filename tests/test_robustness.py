"""simulate() on random valid configs ends in a Result or one of kdsim's documented
errors (ConfigError, DivergenceError, MemoryBudgetError): never a linear-algebra
traceback and never finite garbage from runaway chains.

Shapes are fixed and small (only the task, the student's rank and the dtype change the
compiled programs, which the examples then share: numeric fields are traced); step sizes are drawn around the stability limit
(half of it up to a thousand times it), in float32 and float64.
"""


import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdsim
from kdsim import config as config_mod
from kdsim.config import ConfigError, SimConfig
from kdsim.memory import MemoryBudgetError

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

import importlib

import pytest

from kdsim import closed_form, evaluation, populations, streams
from kdsim.cli import main as cli_main

from helpers import data_for

simulate_mod = importlib.import_module("kdsim.simulate")
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
    per_dataset, _, notes = evaluation.linear_columns(run)
    assert np.isnan(per_dataset["kl_exact"][:2]).all() and np.isfinite(per_dataset["kl_exact"][2])
    assert any(n.startswith("kl_exact: NaN in datasets [0, 1]") for n in notes)
    assert np.isnan(per_dataset["klpred_exact"][0]) and np.isfinite(per_dataset["klpred_exact"][2])
    # the last dataset is untouched: the same value as an unbroken evaluation
    monkeypatch.setattr(closed_form, "finite_time", original)
    clean, _, _ = evaluation.linear_columns(run)
    assert per_dataset["kl_exact"][2] == clean["kl_exact"][2]


def test_a_sweep_point_beyond_the_limit_is_named():
    base = {**ISSUE, "num_datasets": 2, "num_particles": 4}
    with pytest.raises(ConfigError, match=r"^sweep point 0 \{'teacher.step_size': 0.3\}: "
                                          r"teacher.step_size = 0.3 is beyond the stability limit"):
        kdsim.sweep(base, {"teacher.step_size": [0.3]}, progress=False)
