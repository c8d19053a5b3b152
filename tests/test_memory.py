"""The memory guard (kdsim/memory.py): estimates, and refusals that say how to chunk
before anything is allocated."""

import pytest

import kdsim
from kdsim import memory, populations
from kdsim.config import ConfigError, SimConfig, resolve


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
