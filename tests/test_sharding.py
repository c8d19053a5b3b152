"""Beyond one process: sweep points as Ray tasks on a local Ray cluster."""

import pandas as pd
import pytest

import kdsim


BASE = {"task": {"d": 3, "k": 2, "n": 16}, "teacher": {"num_steps": 40},
        "num_datasets": 2, "num_particles": 32}
GRID = {"student.alpha": [0.0, 0.5, 1.0]}


@pytest.fixture(scope="module")
def local_ray():
    # only the Ray tests need Ray; the two-process JAX test below runs without it
    ray = pytest.importorskip("ray", reason='the Ray extra is installed by scripts/test.sh: '
                              'pip install "kdsim[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"CI": "1", "JAX_PLATFORMS": "cpu"}})
    yield
    ray.shutdown()


def test_ray_sweep_gives_the_serial_table(local_ray, tmp_path):
    from kdsim import ray_executor
    table = kdsim.sweep(BASE, GRID, out=str(tmp_path / "ray"), executor=ray_executor())
    serial = kdsim.sweep(BASE, GRID)
    pd.testing.assert_frame_equal(table, serial, check_exact=True)
    # the store is the ordinary one: a plain resume reads every point back
    pd.testing.assert_frame_equal(kdsim.load_sweep(tmp_path / "ray"), serial, check_exact=True)


def test_a_failing_ray_point_keeps_the_finished_ones(local_ray, tmp_path):
    from kdsim import ray_executor
    # the second point fails: its step size is beyond the data's stability limit
    hot = {"teacher.step_size": [1e-4, 50.0]}
    with pytest.raises(Exception, match="sweep point 1 .* beyond the stability limit"):
        kdsim.sweep(BASE, hot, out=str(tmp_path / "s"), executor=ray_executor())
    assert kdsim.load_sweep(tmp_path / "s")["point"].unique().tolist() == [0]


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
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_jax_processes_reproduce_the_single_process_run(tmp_path):
    """Multi-host JAX on localhost: two processes share one population, split over
    datasets or over particles (and chunked): the states agree to float32 rounding,
    float64 estimates within 1e-10 (SPEC §11)."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    from helpers import assert_layout_close, flat_states

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
