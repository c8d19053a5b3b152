"""Scale without changing a number: particle chunks, device layouts, the memory guard,
the linear fast path and the engine's matmul precision."""

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

SMALL = {"task": {"d": 4, "k": 2, "n": 32}, "teacher": {"num_steps": 60},
         "student": {"langevin": {"num_steps": 40}}, "num_datasets": 2, "num_particles": 10}


def _pops(cfg):
    return kdsim.run_populations(cfg, progress=False).populations


def test_particle_chunks_give_the_same_populations():
    """Draws are keyed by global particle index: chunking (a padded last chunk included)
    changes only how many chains are on the device at once. XLA vectorises a batch by
    its shape, so float32 arithmetic may differ in the last bit, never more; the same
    chunking is bit-identical run to run."""
    whole, chunked = _pops(SMALL), _pops({**SMALL, "particle_chunk": 4})
    assert whole.student_sub is not None
    for name in ("teacher", "student", "student_sub", "scratch", "girsanov"):
        if getattr(whole, name) is None:
            assert getattr(chunked, name) is None, name
            continue
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=2e-6, atol=1e-7,
                                   err_msg=name)
    for name in ("diverged_T", "diverged_S", "diverged_step_T"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name), err_msg=name)
    again = _pops({**SMALL, "particle_chunk": 4})
    np.testing.assert_array_equal(again.student, chunked.student)
    assert chunked.teacher.shape == whole.teacher.shape


def test_particle_chunks_in_an_mlp_task():
    cfg = {"task": {"name": "mlp_regression", "d": 3, "k": 1, "n": 8, "n_test": 8},
           "teacher": {"num_steps": 20, "model": {"width": 4}}, "student": {"langevin": {"num_steps": 10},
                                                                          "model": {"width": 3}},
           "num_datasets": 1, "num_particles": 6}
    whole, chunked = _pops(cfg), _pops({**cfg, "particle_chunk": 4})
    for a, b in zip(jax.tree_util.tree_leaves(whole.student), jax.tree_util.tree_leaves(chunked.student)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)


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
            shared_B=True, girsanov=False).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops.append(cost["flops"])
    assert flops[0] == flops[1] > 0


def test_engine_precision_is_validated_and_applied():
    with pytest.raises(ConfigError, match="engine_precision"):
        SimConfig.from_dict({"engine_precision": "fastest"})
    a = _pops(SMALL)
    b = _pops({**SMALL, "engine_precision": "highest"})
    np.testing.assert_allclose(b.teacher, a.teacher, rtol=1e-4, atol=1e-5)


_CHILD = r"""
import json, sys, numpy as np, jax, kdsim
for i, cfg in enumerate(json.loads(sys.argv[1])):
    res = kdsim.simulate(cfg)
    run = kdsim.run_populations(cfg)
    np.savez(f"{sys.argv[2]}/per_dataset_{i}.npz", **{c: res.per_dataset[c].to_numpy(float)
             for c in ("gen_T", "gen_S", "gen_T_se", "kl_gaussian_diag", "B0_upper", "F_B0_upper")})
    np.savez(f"{sys.argv[2]}/pops_{i}.npz", T=run.populations.teacher, S=run.populations.student,
             n=jax.local_device_count())
"""

SPREAD = [{**SMALL, "num_datasets": 4},                                  # datasets split
          {**SMALL, "num_datasets": 3, "num_particles": 12},             # particles split
          {**SMALL, "num_datasets": 3, "num_particles": 12, "dtype": "float64",
           "particle_chunk": 8}]                                         # + chunks, float64


def test_population_spread_over_four_devices(tmp_path):
    """Split over datasets: bit-identical to one device. Split over particles (and
    chunked): the same draws, float32 arithmetic of a differently shaped batch (last-bit
    differences); in float64 every estimate agrees within 1e-12 relative."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "CI": "1"}
    subprocess.run([sys.executable, "-c", _CHILD, json.dumps(SPREAD), str(tmp_path)], env=env,
                   check=True, timeout=600)
    for i, cfg in enumerate(SPREAD):
        four, one = np.load(tmp_path / f"pops_{i}.npz"), _pops(cfg)
        assert int(four["n"]) == 4
        if i == 0:
            np.testing.assert_array_equal(four["T"], one.teacher)
            np.testing.assert_array_equal(four["S"], one.student)
        else:
            np.testing.assert_allclose(four["T"], one.teacher, rtol=2e-6, atol=1e-7)
            np.testing.assert_allclose(four["S"], one.student, rtol=2e-6, atol=1e-7)
        if cfg.get("dtype") == "float64":
            multi = np.load(tmp_path / f"per_dataset_{i}.npz")
            single = kdsim.simulate(cfg).per_dataset
            for col in multi.files:
                np.testing.assert_allclose(multi[col], single[col].to_numpy(float), rtol=1e-12,
                                           err_msg=col)


def test_layout_chooses_the_axis_that_divides():
    from kdsim import sharding
    devs = jax.local_devices()
    assert sharding.layout(16, 256, devs[:1]).mesh is None
    env = {}
    sharding.cpu_device_flags(env)
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=")
    sharding.cpu_device_flags(env)                       # idempotent
    assert env["XLA_FLAGS"].count("device_count") == 1
