"""Configuration (kdsim/config.py): defaults (API.md), round trips, validation messages,
resolution, and random (hypothesis) dicts and TOML texts that give a config or the
promised one-line ConfigError, never anything else."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdsim
from kdsim import config as config_mod
from kdsim.config import (ConfigError, SimConfig, field_paths, load_config, parse_toml,
                          resolve)


def test_defaults_match_api():
    cfg = SimConfig()
    assert (cfg.task.name, cfg.task.d, cfg.task.k, cfg.task.n) == ("linear_gaussian", 8, 2, 64)
    assert (cfg.task.noise, cfg.task.input_scale, cfg.task.input_decay, cfg.task.signal_decay) == (0.5, 1.0, 0.0, 1.0)
    assert cfg.task.n_test == 4096
    assert (cfg.task.num_classes, cfg.task.planted_width, cfg.task.planted_scale) == (3, 32, 2.0)
    assert (cfg.teacher.prior_scale, cfg.teacher.init_scale, cfg.teacher.num_steps) == (1.0, 1.0, 2000)
    assert (cfg.teacher.model.width, cfg.teacher.model.depth, cfg.teacher.model.activation) == (64, 1, "tanh")
    assert (cfg.student.alpha, cfg.student.rank, cfg.student.teacher_noise, cfg.student.temperature) == (0.0, None, 0.0, 1.0)
    assert cfg.student.model.width == 8
    est = cfg.estimators
    assert (est.knn_k, est.ess_fraction, est.c_lam, est.b3_holdout) == (5, 0.1, 0.5, 0.25)
    assert (cfg.num_datasets, cfg.num_particles, cfg.seed, cfg.dtype) == (16, 256, 0, "float32")


def test_resolved_defaults_follow_spec():
    cfg = SimConfig()
    res = resolve(cfg)
    gamma = 64 / 0.5**2
    assert res.numeric.teacher.gamma == gamma
    h = 0.1 / (gamma * 1.0 * (1 + math.sqrt(8 / 64)) ** 2 + 1.0)
    assert res.numeric.teacher.step_size == pytest.approx(h, rel=1e-15)
    assert res.numeric.student == res.numeric.teacher      # student inherits the teacher
    assert res.numeric.channel_noise == 0.5
    assert res.bound_divergence == "exact" and res.cgf == "exact"
    assert res.static.rank == 8 and res.static.full_student
    assert res.static.student_steps == 2000
    rank = resolve(SimConfig.from_dict({"student": {"rank": 3}}))
    assert rank.bound_divergence == "girsanov" and not rank.static.full_student


def test_student_inherits_teacher_settings_and_own_defaults():
    cfg = SimConfig.from_dict({"teacher": {"gamma": 10.0, "step_size": 1e-3, "num_steps": 50}})
    res = resolve(cfg)
    assert res.numeric.student.gamma == 10.0 and res.numeric.student.step_size == 1e-3
    assert res.static.student_steps == 50
    # an unset student step size is the SPEC formula at the student's own gamma and prior
    cfg = SimConfig.from_dict({"student": {"langevin": {"gamma": 32.0, "prior_scale": 2.0}}})
    res = resolve(cfg)
    expect = 0.1 / (32.0 * (1 + math.sqrt(8 / 64)) ** 2 + 1 / 4)
    assert res.numeric.student.step_size == pytest.approx(expect, rel=1e-15)
    assert res.numeric.teacher.step_size != res.numeric.student.step_size


def test_round_trips():
    cfg = SimConfig.from_dict({"task": {"d": 5, "n": 40, "noise": 0.3},
                               "student": {"rank": 2, "alpha": 0.25, "langevin": {"gamma": 12}},
                               "estimators": {"channel_noise": 0.7}, "seed": 3, "dtype": "float64"})
    assert SimConfig.from_dict(cfg.to_dict()) == cfg
    assert SimConfig.from_dict(parse_toml(cfg.to_toml())) == cfg
    assert cfg.student.langevin.gamma == 12.0 and isinstance(cfg.student.langevin.gamma, float)
    assert cfg.hash() == SimConfig.from_dict(cfg.to_dict()).hash()
    assert cfg.hash() != SimConfig().hash()


def test_dotted_keys_and_replace():
    cfg = SimConfig.from_dict({"task.n": 16, "student.alpha": 0.5})
    assert cfg.task.n == 16 and cfg.student.alpha == 0.5
    cfg2 = cfg.replace({"teacher.gamma": 3.0, "task.d": 4})
    assert cfg2.teacher.gamma == 3.0 and cfg2.task.d == 4 and cfg2.task.n == 16
    assert cfg.teacher.gamma is None  # frozen: replace made a new object


def test_load_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('num_datasets = 4\n[task]\nd = 3\n[student.langevin]\nnum_steps = 7\n')
    cfg = load_config(path)
    assert cfg.num_datasets == 4 and cfg.task.d == 3 and cfg.student.langevin.num_steps == 7
    assert kdsim.load_config is load_config


BAD = [
    ({"task": {"d": 0}}, "task.d must be an integer >= 1"),
    ({"task": {"n": 2.5}}, "task.n must be an integer"),
    ({"task": {"n": True}}, "task.n must be an integer"),
    ({"task": {"noise": -0.1}}, "task.noise must be a finite number > 0"),
    ({"task": {"noise": float("nan")}}, "task.noise must be a finite number > 0"),
    ({"task": {"name": "resnet"}}, "task.name must be one of 'linear_gaussian'"),
    ({"teacher": {"gamma": 0}}, "teacher.gamma must be a finite number > 0 or null"),
    ({"teacher": {"step_size": float("inf")}}, "teacher.step_size must be a finite number > 0"),
    ({"teacher": {"num_steps": -1}}, "teacher.num_steps must be an integer >= 0"),
    ({"student": {"alpha": 1.5}}, "student.alpha must be a finite number >= 0 and <= 1"),
    ({"student": {"temperature": 0.0}}, "student.temperature must be a finite number > 0"),
    ({"student": {"rank": 9}}, "student.rank must be <= task.d = 8"),
    ({"student": {"langevin": {"prior_scale": -1}}}, "student.langevin.prior_scale must be"),
    ({"student": {"model": {"width": 0}}}, "student.model.width must be an integer >= 1"),
    ({"estimators": {"c_lam": 1.0}}, "estimators.c_lam must be a finite number > 0 and < 1"),
    ({"estimators": {"bound_divergence": "vibes"}}, "estimators.bound_divergence must be one of"),
    ({"num_particles": 1}, "num_particles must be an integer >= 2"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"dtype": "float16"}, "dtype must be one of 'float32', 'float64'"),
    ({"task": {"name": "mlp_classification"}, "student": {"teacher_noise": 0.5}},
     "student.teacher_noise must be 0 for mlp_classification"),
    ({"task": "linear"}, "task must be a table"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_values_name_field_and_range(bad, message):
    with pytest.raises(ConfigError) as info:
        SimConfig.from_dict(bad)
    assert message in str(info.value)


def test_unknown_keys_rejected_with_hint():
    with pytest.raises(ConfigError, match=r"unknown key 'task.nn' \(did you mean 'task.n'\?\)"):
        SimConfig.from_dict({"task": {"nn": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'num_particle' \(did you mean 'num_particles'\?\)"):
        SimConfig.from_dict({"num_particle": 3})
    with pytest.raises(ConfigError, match="unknown key 'student.langevin.gama'"):
        SimConfig.from_dict({"student.langevin.gama": 3})


def test_bad_toml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[task\nd = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_field_paths_cover_api_names():
    paths = set(field_paths())
    for name in ["task.name", "task.d", "task.k", "task.n", "task.noise", "task.input_scale",
                 "task.input_decay", "task.signal_decay", "task.n_test", "task.num_classes",
                 "task.planted_width", "task.planted_scale", "teacher.gamma", "teacher.prior_scale",
                 "teacher.init_scale", "teacher.step_size", "teacher.num_steps",
                 "teacher.model.width", "teacher.model.depth", "teacher.model.activation",
                 "student.alpha", "student.rank", "student.teacher_noise", "student.temperature",
                 "student.langevin.gamma", "student.langevin.prior_scale",
                 "student.langevin.init_scale", "student.langevin.step_size",
                 "student.langevin.num_steps", "student.model.width",
                 "estimators.bound_divergence", "estimators.cgf", "estimators.channel_noise",
                 "estimators.ghost_points", "estimators.knn_k", "estimators.ess_fraction",
                 "estimators.c_lam", "estimators.b3_holdout", "num_datasets", "num_particles",
                 "seed", "dtype"]:
        assert name in paths, name


def test_step_sizes_are_judged_on_the_data_not_at_resolve():
    # resolve() knows no data: the exact stability check runs once the datasets are drawn
    # (tests/test_robustness.py); the Marchenko--Pastur estimate only sets the default
    assert resolve(SimConfig.from_dict({"teacher": {"step_size": 0.1}})).warnings == ()
    assert resolve(SimConfig()).warnings == ()


def test_girsanov_refuses_where_it_does_not_bound():
    for over, why in [({"student.rank": 2}, "rank-r student"),
                      ({"student.langevin.step_size": 1e-4}, "step size differs"),
                      ({"student.langevin.num_steps": 10}, "number of steps differs"),
                      ({"student.langevin.init_scale": 0.5}, "initial law differs")]:
        cfg = SimConfig.from_dict({"task": {"d": 3}}).replace(over)
        res = resolve(cfg)
        assert not res.girsanov and why in res.girsanov_reason
        with pytest.raises(kdsim.ConfigError, match="bound_divergence = 'girsanov' does not apply"):
            resolve(cfg.replace({"estimators.bound_divergence": "girsanov"}))


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
