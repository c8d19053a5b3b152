"""Scale without changing the laws: particle chunks, device layouts, the memory guard,
the linear fast path and the engine's matmul precision. Layouts draw the same numbers
and agree to float32 rounding (SPEC §11: tests/helpers.py holds the tolerances)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdsim
from kdsim import memory, populations
from kdsim.config import ConfigError, SimConfig, resolve

from helpers import ESTIMATE_RTOL_F64, assert_layout_close, flat_states

SMALL = {"task": {"d": 4, "k": 2, "n": 32}, "teacher": {"num_steps": 60},
         "student": {"langevin": {"num_steps": 40}}, "num_datasets": 2, "num_particles": 10}
# the student runs as long as the teacher: the Girsanov sum applies
SMALL_G = {**SMALL, "student": {"langevin": {"num_steps": 60}}}


def _pops(cfg):
    return kdsim.run_populations(cfg, progress=False).populations


def test_particle_chunks_give_the_same_populations():
    """Draws are keyed by global particle index: chunking (a padded last chunk included)
    gives the whole run's states and Girsanov sums to float32 rounding, the same
    divergence flags, and the same chunked run again bit for bit."""
    whole, chunked = _pops(SMALL_G), _pops({**SMALL_G, "particle_chunk": 4})
    assert whole.student_sub is not None and whole.scratch is not None
    assert whole.girsanov is not None
    for name in ("teacher", "student", "student_sub", "scratch", "girsanov"):
        assert_layout_close(getattr(chunked, name), getattr(whole, name), name)
    for name in ("diverged_T", "diverged_S", "diverged_step_T"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name), err_msg=name)
    again = _pops({**SMALL_G, "particle_chunk": 4})
    np.testing.assert_array_equal(again.student, chunked.student)
    assert chunked.teacher.shape == whole.teacher.shape


MLP_G = {"task": {"name": "mlp_regression", "d": 3, "k": 1, "n": 8, "n_test": 8},
         "teacher": {"num_steps": 20, "model": {"width": 4}},
         "student": {"alpha": 0.4, "langevin": {"num_steps": 20}, "model": {"width": 4}},
         "num_datasets": 1, "num_particles": 6}         # same architecture: Girsanov applies


@pytest.mark.parametrize("task,chunk", [("mlp_regression", 4), ("mlp_classification", 1)])
def test_particle_chunks_in_an_mlp_task(task, chunk):
    """Chunks of 4 particles (a padded last chunk included) or of 1 (a batch of one
    chain) end in the whole run's states and Girsanov sums to float32 rounding."""
    cfg = {**MLP_G, "task": {**MLP_G["task"], "name": task}}
    whole = _pops(cfg)
    assert whole.girsanov is not None and whole.scratch is not None
    chunked = _pops({**cfg, "particle_chunk": chunk})
    for name in ("teacher", "student", "scratch", "girsanov"):
        assert_layout_close(flat_states(getattr(chunked, name)), flat_states(getattr(whole, name)),
                            f"{name}, chunks of {chunk}")
    np.testing.assert_array_equal(chunked.diverged_S, whole.diverged_S)


def test_memory_guard_stops_before_allocating_and_says_how_to_chunk():
    cfg = SimConfig.from_dict({"num_datasets": 16, "num_particles": 1 << 20})
    res = resolve(cfg)
    est = memory.estimate(res)
    free_device = est.engine_bytes / 10            # a tenth of what the whole population needs
    with pytest.raises(memory.MemoryBudgetError, match=r"set particle_chunk <= (\d+)") as err:
        memory.check(res, free=(free_device, float("inf")))
    suggested = int(err.value.args[0].split("particle_chunk <= ")[1].split()[0])
    assert 0 < suggested < (1 << 20) // 10
    chunked = resolve(cfg.replace({"particle_chunk": suggested}))
    memory.check(chunked, free=(free_device, float("inf")))     # the advice works
    with pytest.raises(memory.MemoryBudgetError, match="host memory"):
        memory.check(res, free=(float("inf"), est.host_bytes / 2))
    # the populations alone (run_populations) need less than a whole simulate
    assert est.population_bytes < est.host_bytes
    memory.check(res, free=(float("inf"), est.population_bytes * 2), evaluate=False)
    assert isinstance(memory.MemoryBudgetError("x"), ConfigError)   # CLI: one line, exit 2


def test_simulate_refuses_a_run_that_cannot_fit(monkeypatch):
    monkeypatch.setattr(memory, "available", lambda: (1e6, 1e12))
    called = []
    monkeypatch.setattr(populations, "run_linear", lambda *a, **k: called.append(1))
    with pytest.raises(memory.MemoryBudgetError, match="particle_chunk"):
        kdsim.simulate({"num_particles": 100_000})
    assert not called


def test_memory_estimate_grows_with_the_chunk_not_the_population():
    a = memory.estimate(resolve(SimConfig.from_dict({"num_particles": 4096, "particle_chunk": 512})))
    b = memory.estimate(resolve(SimConfig.from_dict({"num_particles": 65536, "particle_chunk": 512})))
    assert a.engine_bytes == b.engine_bytes and b.host_bytes == 16 * a.host_bytes


def test_linear_step_cost_does_not_grow_with_n():
    """The compiled teacher segment sees the data only through X^T X / n and Y^T X / n."""
    from kdsim.progress import SEGMENT_STEPS
    flops = []
    for n in (64, 65536):
        res = resolve(SimConfig.from_dict({"task": {"d": 16, "k": 2, "n": n}, "num_particles": 8}))
        E, P, k, d = 16, 8, 2, 16
        state = populations._initial_state(jnp.zeros((E, P, k, d)))
        keys = jax.random.split(jax.random.key(0), E * P).reshape(E, P)
        C, B = jnp.zeros((E, d, d)), jnp.zeros((E, k, d))
        p = jax.tree_util.tree_map(jnp.float32, res.numeric.teacher)
        compiled = populations._linear_segment.lower(
            state, None, jnp.int32(0), keys, C, B, C, B, p, p, num_steps=SEGMENT_STEPS,
            shared_B=True, girsanov=False, schedule="constant", phase_steps=SEGMENT_STEPS).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops.append(cost["flops"])
    assert flops[0] == flops[1] > 0


def test_engine_precision_is_validated_and_keeps_float32_rounding():
    with pytest.raises(ConfigError, match="engine_precision"):
        SimConfig.from_dict({"engine_precision": "fastest"})
    a = _pops(SMALL)
    b = _pops({**SMALL, "engine_precision": "highest"})
    # on a CPU a float32 matmul is exact float32 at any precision setting
    assert_layout_close(b.teacher, a.teacher, "teacher")
    assert_layout_close(b.student, a.student, "student")


_CHILD = r"""
import json, sys, numpy as np, jax, kdsim
for i, cfg in enumerate(json.loads(sys.argv[1])):
    res = kdsim.simulate(cfg)
    run = kdsim.run_populations(cfg)
    np.savez(f"{sys.argv[2]}/per_dataset_{i}.npz", **{c: res.per_dataset[c].to_numpy(float)
             for c in ("gen_T", "gen_S", "gen_T_se", "kl_gaussian_diag", "B0_upper", "F_B0_upper")})
    flat = lambda t: np.concatenate([np.reshape(x, np.shape(x)[:2] + (-1,)) for x in jax.tree_util.tree_leaves(t)], -1)
    np.savez(f"{sys.argv[2]}/pops_{i}.npz", T=flat(run.populations.teacher), S=flat(run.populations.student),
             G=run.populations.girsanov, n=jax.local_device_count())
"""

SPREAD = [{**SMALL_G, "num_datasets": 4},                                # datasets split
          {**SMALL_G, "num_datasets": 3, "num_particles": 12, "dtype": "float64",
           "particle_chunk": 8}]                                         # particles split, chunks, float64
# (MLP populations in other batch shapes: test_particle_chunks_in_an_mlp_task here, split
# over two processes: tests/test_sharding.py)


def test_population_spread_over_four_devices(tmp_path):
    """Split over datasets or over particles (and chunked), the states agree with one
    device to float32 rounding (the same draws; XLA may pick other kernels for other
    shapes). In float64 every estimate agrees within 1e-10 relative."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "CI": "1"}
    subprocess.run([sys.executable, "-c", _CHILD, json.dumps(SPREAD), str(tmp_path)], env=env,
                   check=True, timeout=600)
    for i, cfg in enumerate(SPREAD):
        four, one = np.load(tmp_path / f"pops_{i}.npz"), _pops(cfg)
        assert int(four["n"]) == 4
        dt = cfg.get("dtype", "float32")
        assert_layout_close(four["T"], flat_states(one.teacher), f"config {i} teacher", dt)
        assert_layout_close(four["S"], flat_states(one.student), f"config {i} student", dt)
        assert_layout_close(four["G"], one.girsanov, f"config {i} girsanov", dt)
        if cfg.get("dtype") == "float64":
            multi = np.load(tmp_path / f"per_dataset_{i}.npz")
            single = kdsim.simulate(cfg).per_dataset
            for col in multi.files:
                np.testing.assert_allclose(multi[col], single[col].to_numpy(float),
                                           rtol=ESTIMATE_RTOL_F64, err_msg=col)


def test_layout_chooses_the_axis_that_divides():
    from kdsim import sharding
    devs = jax.local_devices()
    assert sharding.layout(16, 256, devs[:1]).mesh is None
    assert sharding.layout(3, 5, devs[:1] * 4) == sharding.Layout(None, None)   # nothing divides
    assert sharding.split_axis(1, 4, 4) == 1 and sharding.split_axis(4, 3, 4) == 0
    env = {}
    sharding.cpu_device_flags(env)
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=")
    sharding.cpu_device_flags(env)                       # idempotent
    assert env["XLA_FLAGS"].count("device_count") == 1


