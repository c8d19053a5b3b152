"""Device layouts and the multi-process share (kdsim/sharding.py): a population spread
over four devices or two JAX processes agrees with one device at the SPEC §11 tolerances
(the same draws; XLA may pick other kernels for other shapes)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pandas as pd

import kdsim

from helpers import ESTIMATE_RTOL_F64, assert_layout_close, flat_states


BASE = {"task": {"d": 3, "k": 2, "n": 16}, "teacher": {"num_steps": 40},
        "num_datasets": 2, "num_particles": 32}


_PROCESS = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
import kdsim
for i, cfg in enumerate(json.loads(sys.argv[3])):
    res = kdsim.simulate(cfg)
    pops = kdsim.run_populations(cfg).populations
    if jax.process_index() == 0:
        res.per_dataset.to_json(f"{sys.argv[4]}/per_dataset_{i}.json", double_precision=15)
        flat = lambda t: np.concatenate([np.reshape(x, np.shape(x)[:2] + (-1,)) for x in jax.tree_util.tree_leaves(t)], -1)
        np.savez(f"{sys.argv[4]}/pops_{i}.npz", T=flat(pops.teacher), S=flat(pops.student),
                 dT=pops.diverged_T, n=jax.process_count())
"""

MULTI = [{**BASE, "num_datasets": 3, "num_particles": 30, "particle_chunk": 8},  # particles split
         {"task": {"name": "mlp_classification", "d": 3, "n": 8, "n_test": 8},    # an MLP, datasets
          "teacher": {"num_steps": 20, "model": {"width": 4}},                    # split and chunked
          "student": {"alpha": 0.4, "langevin": {"num_steps": 20}, "model": {"width": 4}},
          "num_datasets": 2, "num_particles": 6, "particle_chunk": 4}]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_jax_processes_reproduce_the_single_process_run(tmp_path):
    """Multi-host JAX on localhost: two processes share one population, split over
    datasets or over particles (and chunked): the states agree to float32 rounding,
    float64 estimates within 1e-10 (SPEC §11)."""
    addr = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "CI": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, addr, str(i), json.dumps(MULTI), str(tmp_path)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    for i, cfg in enumerate(MULTI):
        got = np.load(tmp_path / f"pops_{i}.npz")
        one = kdsim.run_populations(cfg).populations
        assert int(got["n"]) == 2
        single = kdsim.simulate(cfg).per_dataset
        multi = pd.read_json(tmp_path / f"per_dataset_{i}.json")
        assert got["S"].dtype == flat_states(one.student).dtype
        assert_layout_close(got["T"], flat_states(one.teacher), f"config {i} teacher")
        assert_layout_close(got["S"], flat_states(one.student), f"config {i} student")
        np.testing.assert_array_equal(got["dT"], one.diverged_T)
        # float32 runs: estimates follow the states' rounding
        cols = ("gen_T", "gen_S", "gen_S_exact", "kl_exact", "kl_gaussian_diag", "kl_girsanov", "test_loss_S")
        for col in [c for c in cols if c in single]:
            np.testing.assert_allclose(multi[col].to_numpy(float), single[col].to_numpy(float),
                                       rtol=1e-3, atol=1e-5, err_msg=col)


SMALL = {"task": {"d": 4, "k": 2, "n": 32}, "teacher": {"num_steps": 60},
         "student": {"langevin": {"num_steps": 40}}, "num_datasets": 2, "num_particles": 10}


# the student runs as long as the teacher: the Girsanov sum applies
SMALL_G = {**SMALL, "student": {"langevin": {"num_steps": 60}}}


def _pops(cfg):
    return kdsim.run_populations(cfg, progress=False).populations


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
