"""Random streams: a particle's draws depend only on (seed, stream, dataset, particle, step)."""

import jax
import numpy as np

from helpers import assert_layout_close
from kdsim import SimConfig, run_populations, streams


def _bits(k):
    return tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())


def test_keys_are_distinct_across_streams_datasets_particles():
    root = streams.root_key(0)
    seen = set()
    for name in streams.STREAMS:
        for e in range(3):
            for i in range(3):
                seen.add(_bits(streams.particle_key(root, name, e, i)))
    assert len(seen) == len(streams.STREAMS) * 9
    assert len(set(streams.STREAMS.values())) == len(streams.STREAMS)


def test_particle_keys_grid_matches_scalar_derivation():
    root = streams.root_key(5)
    grid = streams.particle_keys(root, "teacher_noise", np.array([2, 7], np.uint32),
                                 np.array([0, 3, 9], np.uint32))
    for a, e in enumerate([2, 7]):
        for b, i in enumerate([0, 3, 9]):
            assert _bits(grid[a, b]) == _bits(streams.particle_key(root, "teacher_noise", e, i))


def test_draws_do_not_depend_on_population_size():
    base = {"task": {"d": 3, "k": 2, "n": 16}, "teacher": {"num_steps": 20},
            "student": {"alpha": 0.3, "teacher_noise": 0.5}}
    small = run_populations(SimConfig.from_dict({**base, "num_datasets": 2, "num_particles": 4}))
    big = run_populations(SimConfig.from_dict({**base, "num_datasets": 3, "num_particles": 9}))
    np.testing.assert_array_equal(small.data.X, big.data.X[:2])
    # the same draws; other batch shapes may round differently (SPEC §11)
    assert_layout_close(small.populations.teacher, big.populations.teacher[:2, :4], "teacher")
    assert_layout_close(small.populations.student_sub, big.populations.student_sub[:2, :4], "student")


def test_different_seeds_give_different_datasets_and_planted_weights():
    a = run_populations({"task": {"d": 3, "n": 8}, "teacher": {"num_steps": 1},
                         "num_datasets": 2, "num_particles": 2, "seed": 0})
    b = run_populations({"task": {"d": 3, "n": 8}, "teacher": {"num_steps": 1},
                         "num_datasets": 2, "num_particles": 2, "seed": 1})
    assert not np.allclose(a.data.X, b.data.X)
    assert not np.allclose(a.data.W_star, b.data.W_star)
    assert not np.allclose(a.data.X[0], a.data.X[1])


def test_segmented_run_is_bit_identical_to_one_scan(monkeypatch):
    """The host loop over scan segments (progress reporting) changes no number."""
    from kdsim import progress
    cfg = {"task": {"d": 3, "k": 2, "n": 16}, "teacher": {"num_steps": 60},
           "student": {"alpha": 0.3, "teacher_noise": 0.5}, "num_datasets": 2, "num_particles": 5}
    monkeypatch.setattr(progress, "SEGMENT_STEPS", 1000)
    whole = run_populations(cfg)
    monkeypatch.setattr(progress, "SEGMENT_STEPS", 7)     # 9 segments of 7 (60 = 8 x 7 + 4)
    assert list(progress.segments(60))[-1] == (56, 4)
    parts = run_populations(cfg)
    np.testing.assert_array_equal(whole.populations.teacher, parts.populations.teacher)
    np.testing.assert_array_equal(whole.populations.student_sub, parts.populations.student_sub)
    np.testing.assert_array_equal(whole.populations.girsanov, parts.populations.girsanov)
