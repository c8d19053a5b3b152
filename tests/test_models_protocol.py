"""The model protocol (SPEC §9, kdsim/models/protocol.py): any flax linen or nnx module,
or plain functions, through one protocol; per-leaf prior and initial scales; Girsanov
decided by structure; clear errors for models that do not fit the task; sweeps keyed by
the models."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kdsim
from kdsim import models, populations, streams
from kdsim.stats import bonferroni_z

D, K = 6, 3
CLS = {"task": {"name": "mlp_classification", "d": D, "n": 24, "n_test": 128, "num_classes": K},
       "teacher": {"num_steps": 30}, "student": {"alpha": 0.3},
       "num_datasets": 2, "num_particles": 8}


class ResCNN(nn.Module):
    """A CNN with LayerNorm and a residual connection, on sequences ``(m, length)``."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3,), padding="SAME")(x[..., None])
        h = h + nn.relu(nn.LayerNorm()(nn.Conv(4, (3,), padding="SAME")(h)))
        return nn.Dense(K)(h.mean(axis=1))


class NnxMLP(nnx.Module):
    def __init__(self, d, width, out, rngs):
        self.hidden = nnx.Linear(d, width, rngs=rngs)
        self.out = nnx.Linear(width, out, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _pair_model(width=5, out=K, d=D):
    """A model given as a pair of plain functions."""
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (d, width)) / math.sqrt(d), "b1": jnp.zeros(width),
                "w2": jax.random.normal(k2, (width, out)) / math.sqrt(width)}

    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]

    return kdsim.Model(init, apply, name="pair")


@pytest.fixture(scope="module")
def cnn_to_nnx():
    return kdsim.simulate(CLS, teacher_model=ResCNN(),
                          student_model=NnxMLP(D, 7, K, nnx.Rngs(0)))


def test_linen_cnn_teacher_distils_into_an_nnx_mlp_student(cnn_to_nnx):
    res = cnn_to_nnx
    df = res.per_dataset
    for col in ["gen_T", "gen_S", "gen_T_01", "gen_S_01", "gen_S_scratch", "test_loss_S",
                "klpred_convexity", "sharpness_top", "gap_curvature", "F_B0_upper", "F_B1_upper",
                "gen_S_F", "klF_convexity"]:
        assert np.all(np.isfinite(df[col])), col
    # different structures: no parameter-space KL, and the notes say why
    assert np.all(np.isnan(df["kl_girsanov"]))
    assert any("parameter structure differs" in n for n in res.notes)
    # the model metadata: classes and parameter counts, counted here from flax directly
    t_params = ResCNN().init(jax.random.key(0), jnp.zeros((1, D)))["params"]
    n_T = sum(x.size for x in jax.tree_util.tree_leaves(t_params))
    n_S = D * 7 + 7 + 7 * K + K
    assert res.meta["models"]["teacher"] == {"name": "ResCNN", "custom": True, "class": "ResCNN",
                                             "num_params": n_T, "scales": res.meta["models"]["teacher"]["scales"]}
    assert res.meta["models"]["student"]["num_params"] == n_S
    # per-leaf scales named in the notes, measured for user modules
    scale_notes = [n for n in res.notes if "per-leaf scales" in n]
    assert len(scale_notes) == 2 and "LayerNorm_0/scale" in scale_notes[0]


def test_scales_are_measured_from_the_initialiser_and_drawn_per_leaf():
    """A linen Dense: its kernel's lecun-normal scale 1/sqrt(fan_in) is measured; its
    zero bias gets bias_scale. The engine draws N(0, (s_init s_leaf)^2) per leaf."""
    prep = models.prepare(nn.Dense(40), role="teacher_model", input_shape=(25,), out=40,
                          dtype="float32", bias_scale=0.3)
    scale = dict(zip(models.protocol.leaf_paths(prep.structure), prep.scales))
    assert scale["bias"] == 0.3
    # 4 draws x 1000 entries of a (truncated, variance-corrected) normal of sd 1/5
    rel_sd = 1 / math.sqrt(2 * 4 * 1000)
    assert abs(scale["kernel"] / 0.2 - 1) < 4 * rel_sd * 1.2
    P, s_init = 200, 0.7
    state, _ = populations._model_init(
        streams.root_key(1), jnp.arange(1, dtype=jnp.uint32), jnp.arange(P, dtype=jnp.uint32),
        jnp.float32(s_init), prep.scale_tree(jnp.float32), structure=prep.structure,
        init_stream="student_init", noise_stream="student_noise", dtype="float32")
    for name, leaf in state.position.items():
        v = np.asarray(leaf, np.float64).ravel()
        want = (s_init * scale[name]) ** 2
        # chi-square on the sum of squares (mean zero): z-score of the variance ratio
        z = (np.mean(v * v) / want - 1) / math.sqrt(2 / v.size)
        assert abs(z) < bonferroni_z(2), (name, z)


def test_given_scales_are_used_and_checked():
    tree = {"bias": 2.0, "kernel": 0.5}
    prep = models.prepare(kdsim.from_linen(nn.Dense(2), (3,), scales=tree), role="student_model",
                          input_shape=(3,), out=2, dtype="float32")
    assert prep.scales == (2.0, 0.5) and prep.scale_source == "given"
    with pytest.raises(kdsim.ModelError, match="finite number > 0"):
        models.prepare(kdsim.from_linen(nn.Dense(2), (3,), scales={"bias": 0.0, "kernel": 1.0}),
                       role="student_model", input_shape=(3,), out=2, dtype="float32")
    with pytest.raises(kdsim.ModelError, match="tree structure"):
        models.prepare(kdsim.from_linen(nn.Dense(2), (3,), scales={"kernel": 1.0}),
                       role="student_model", input_shape=(3,), out=2, dtype="float32")


def test_girsanov_on_a_user_model_pair():
    """The same plain-function model as teacher and student: Girsanov applies and every
    student carries a positive path-space sum; with alpha = 1 and the teacher's gamma the
    two drifts coincide and the sum vanishes (to float32 rounding of the cotangents)."""
    model = _pair_model()
    run = kdsim.run_populations({**CLS, "estimators": {"scratch": False}}, teacher_model=model,
                                student_model=model)
    assert run.resolved.girsanov and np.all(run.populations.girsanov > 0)
    assert run.models[0].num_params == D * 5 + 5 + 5 * K
    same = kdsim.run_populations({**CLS, "student": {"alpha": 1.0}, "estimators": {"scratch": False}},
                                 teacher_model=model, student_model=model)
    assert np.max(same.populations.girsanov) < 1e-9 * np.min(run.populations.girsanov)


def test_girsanov_between_different_structures_is_refused_before_training(monkeypatch):
    called = []
    monkeypatch.setattr(populations, "run_model", lambda *a, **k: called.append(1))
    with pytest.raises(kdsim.ConfigError, match=r"estimators.girsanov = true does not apply: the "
                       r"student's parameter structure differs .*teacher ResCNN: \d+ parameters"):
        kdsim.simulate({**CLS, "estimators": {"girsanov": True}}, teacher_model=ResCNN(),
                       student_model=_pair_model())
    assert not called


@pytest.mark.parametrize("bad,match", [
    (lambda: _pair_model(out=K + 1), r"maps inputs \(m, 6\) to \(2, 4\) with m = 2; the task needs "
                                     r"\(m, 3\) \(3 class logits\)"),
    (lambda: kdsim.Model(lambda k: {"w": jnp.zeros((7, K))}, lambda p, x: x @ p["w"]),
     r"student_model \(.*\) fails on the task's inputs of shape \(m, 6\)"),
    (lambda: kdsim.Model(lambda k: {"w": jnp.zeros((D, K), jnp.int32)}, lambda p, x: x @ p["w"]),
     r"parameter w has dtype int32"),
    (lambda: object(), r"must be a kdsim.Model\(init, apply\), a flax linen module"),
])
def test_models_that_do_not_fit_the_task_get_one_clear_error(bad, match, monkeypatch):
    called = []
    monkeypatch.setattr(populations, "run_model", lambda *a, **k: called.append(1))
    with pytest.raises(kdsim.ConfigError, match=match):
        kdsim.simulate(CLS, student_model=bad())
    assert not called


def test_linear_task_takes_no_model():
    with pytest.raises(kdsim.ConfigError, match="linear_gaussian has its own linear model"):
        kdsim.simulate({"num_particles": 4}, teacher_model=_pair_model())


def test_sweep_passes_user_models_and_keys_points_by_them(tmp_path):
    model = _pair_model()
    base = {**CLS, "teacher": {"num_steps": 10}, "estimators": {"scratch": False}}
    table = kdsim.sweep(base, {"student.alpha": [0.2]}, out=tmp_path / "s", teacher_model=model,
                        student_model=model)
    assert np.all(np.isfinite(table["kl_girsanov"]))
    with pytest.raises(kdsim.SweepError, match="models differ"):
        kdsim.sweep(base, {"student.alpha": [0.2]}, out=tmp_path / "s", teacher_model=_pair_model(6),
                    student_model=model)
