"""The throughput benchmark's own logic: interleaved repeats and the regression check."""

import copy
import json
import os
import sys

import pytest

MACHINE = dict(device="cpu", cpu_count=2, machine="x86_64", python="3", jax="0", kdsim="0", date="today")


@pytest.fixture(scope="module")
def throughput():
    saved = os.environ.get("XLA_FLAGS")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import throughput as module       # asks XLA for one CPU device per core on import
    finally:
        sys.path.pop(0)
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved
    return module


def test_repeats_are_interleaved_and_rates_are_work_over_median(throughput, monkeypatch):
    clock, calls = [0.0], []

    def work_for(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds
        return fn

    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    runs = [(work_for("a", 1.0), 10.0), (work_for("b", 4.0), 20.0)]
    out = throughput._median_rates(runs, repeats=3)
    # the first (compiling) calls, then the repeats alternate
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert out == [(10.0, 0.0, 1.0), (5.0, 0.0, 4.0)]


def _result(engine_ratio, spread=0.02):
    rows = [{"task": "linear", "particles": 1024, "impl": "minimal JAX", "rate": 1e5, "ratio": 1.0,
             "spread": spread},
            {"task": "linear", "particles": 1024, "impl": "kdsim engine", "rate": engine_ratio * 1e5,
             "ratio": engine_ratio, "spread": spread}]
    return {"machine": {"device": "cpu"}, "rows": rows}


def test_compare_flags_a_halved_ratio_and_passes_an_unchanged_one(throughput, tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_result(2.0)))
    assert throughput.compare(copy.deepcopy(_result(2.0)), str(old)) == 0
    assert throughput.compare(_result(1.0), str(old)) == 1
    assert "REGRESSION" in capsys.readouterr().out
    # with 10% spread in every repeat, a 30% drop is noise and a 65% drop is not
    noisy = tmp_path / "noisy.json"
    noisy.write_text(json.dumps(_result(2.0, spread=0.1)))
    assert throughput.compare(_result(1.4, spread=0.1), str(noisy)) == 0
    assert throughput.compare(_result(0.7, spread=0.1), str(noisy)) == 1


def test_engine_targets_are_speed_ups_over_each_baseline(throughput):
    """The lean engine target reads seconds: baseline / engine >= 1.8 is met."""
    result = {"machine": {"platform": "cpu"}, "rows": [], "engine_vs": [
        {"config": "lean", "particles": 1024, "steps": 4000, "spread": 0.0,
         "seconds": {"kdsim engine": 1.0, "minimal JAX": 2.0, "BlackJAX sgld": 1.5}}]}
    lines = throughput.targets_met(result)
    assert lines == ["lean: engine (teacher + student) 2.00x minimal JAX (target >= 1.8): met",
                     "lean: engine (teacher + student) 1.50x BlackJAX sgld (target >= 1.8): NOT met"]
    assert "| BlackJAX sgld | 1.50 | 1.50x |" in throughput.markdown({**result, "args": "",
                                                                       "machine": {**result["machine"],
                                                                                   **MACHINE}})
