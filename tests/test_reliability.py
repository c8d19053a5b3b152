"""What kdsim does when things go wrong: malformed input, blow-ups, interruptions."""

import importlib
import math
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
from kdsim import config as config_mod
from kdsim import evaluation
from kdsim.config import ConfigError, SimConfig, field_paths, parse_toml
from kdsim.tasks import linear_gaussian as lg

simulate_mod = importlib.import_module("kdsim.simulate")   # kdsim.simulate is the function
FIELDS = field_paths()
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["linear_gaussian", "mlp_regression", "mlp_classification", "tanh", "relu",
                     "exact", "knn", "girsanov", "empirical", "float64", "highest"]),
    st.lists(st.integers(0, 5), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=16),
                 st.sampled_from([f + "x" for f in FIELDS[:10]] + ["task", "teacher.model", "student"]))


def _valid_or_config_error(build):
    """Either a valid, round-trippable config, or a ConfigError: nothing else."""
    try:
        cfg = build()
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)
        return None
    assert isinstance(cfg, SimConfig)
    assert SimConfig.from_dict(cfg.to_dict()) == cfg
    assert SimConfig.from_dict(parse_toml(cfg.to_toml())) == cfg
    try:
        config_mod.resolve(cfg)
    except ConfigError:
        pass
    return cfg


@SETTINGS
@given(st.dictionaries(keys, values, max_size=6))
def test_random_dicts_give_a_config_or_the_promised_error(d):
    _valid_or_config_error(lambda: SimConfig.from_dict(d))


@SETTINGS
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_random_toml_text_gives_a_config_or_the_promised_error(text):
    _valid_or_config_error(lambda: SimConfig.from_dict(parse_toml(text)))


@st.composite
def near_valid_toml(draw):
    """Valid-looking TOML: real field names with random TOML literals (bad types, ranges,
    nan/inf, arrays, tables)."""
    literal = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(
        lambda x: "nan" if math.isnan(x) else ("inf" if x == math.inf else ("-inf" if x == -math.inf else repr(x)))),
        st.sampled_from(["true", "false", '"float32"', '"relu"', '"exact"', "[1, 2]", "{a = 1}",
                         '"__import__(\'os\').system(\'true\')"', "1e309", "0", "-0.0", '""']))
    lines = [f"{draw(st.sampled_from(FIELDS))} = {draw(literal)}" for _ in range(draw(st.integers(1, 5)))]
    return "\n".join(lines) + "\n"


@SETTINGS
@given(near_valid_toml())
def test_near_valid_toml_gives_a_config_or_the_promised_error(text):
    _valid_or_config_error(lambda: SimConfig.from_dict(parse_toml(text)))


def test_configs_are_data_and_size_capped(tmp_path):
    with pytest.raises(ConfigError, match="num_particles must be an integer"):
        SimConfig.from_dict(parse_toml('num_particles = "__import__(\'os\').getpid()"'))
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * config_mod.MAX_TOML_BYTES + "\n")
    with pytest.raises(ConfigError, match=f"the limit is {config_mod.MAX_TOML_BYTES}"):
        kdsim.load_config(big)
    for bad, field in (({"teacher": {"step_size": float("nan")}}, "teacher.step_size"),
                       ({"student": {"temperature": float("inf")}}, "student.temperature"),
                       ({"max_diverged_fraction": 1.5}, "max_diverged_fraction")):
        with pytest.raises(ConfigError, match=field):
            SimConfig.from_dict(bad)


# ---------------------------------------------------------------------------------------
# blow-ups

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


def test_divergence_error_keeps_the_computed_run():
    with pytest.raises(kdsim.DivergenceError) as err:
        kdsim.simulate(HOT_MLP)
    pops = err.value.run.populations
    assert pops.diverged_T.all()
    for leaf in jax.tree_util.tree_leaves(pops.teacher):   # frozen at the last healthy state
        assert np.isfinite(leaf).all()


def _with_diverged(run, e, idx):
    diverged = run.populations.diverged_T.copy()
    diverged[e, idx] = True
    steps = run.populations.diverged_step_T.copy()
    steps[e, idx] = 7
    return run._replace(populations=run.populations._replace(diverged_T=diverged, diverged_step_T=steps))


def test_diverged_pairs_are_dropped_loudly_and_too_many_fail():
    run = kdsim.run_populations(TINY)
    hit = _with_diverged(run, 0, [1, 4, 5])
    per_dataset, _, notes = evaluation.linear_columns(hit)
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
    per_dataset, _, notes = evaluation.linear_columns(run)
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
