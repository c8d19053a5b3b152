"""Result files (kdsim/io.py, Result.save and kdsim.load_result): exact round trips,
infinities kept, and corrupted, truncated or foreign files refused by checksum and schema."""

import json

import numpy as np
import pandas as pd
import pytest

import kdsim
from kdsim.io import JSON_NAME, NPZ_NAME, ResultFileError

from helpers import SMALL_LINEAR


def test_save_load_round_trip_is_exact(small_result, tmp_path):
    res = small_result
    res.save(tmp_path / "r")
    back = kdsim.load_result(tmp_path / "r")
    pd.testing.assert_frame_equal(back.per_dataset, res.per_dataset, check_exact=True)
    pd.testing.assert_frame_equal(back.summary, res.summary, check_exact=True)
    assert back.config == res.config and back.notes == res.notes
    for key in res.datasets:
        np.testing.assert_array_equal(back.datasets[key], res.datasets[key])
    assert back.meta == json.loads(json.dumps(back.meta))


def test_round_trip_keeps_infinities(tmp_path):
    res = kdsim.simulate({**SMALL_LINEAR, "student": {"rank": 1}})
    res.save(tmp_path / "r")
    back = kdsim.load_result(tmp_path / "r")
    pd.testing.assert_frame_equal(back.per_dataset, res.per_dataset, check_exact=True)
    pd.testing.assert_frame_equal(back.summary, res.summary, check_exact=True)


def test_corrupted_or_foreign_results_are_refused(small_result, tmp_path):
    # a well-formed npz with one value changed: only the checksum can tell
    small_result.save(tmp_path / "t")
    npz = tmp_path / "t" / NPZ_NAME
    with np.load(npz) as f:
        arrays = {k: f[k].copy() for k in f.files}
    name = next(k for k, v in arrays.items() if v.dtype == np.float64 and v.size)
    arrays[name].flat[0] += 1.0
    np.savez(npz, **arrays)
    with pytest.raises(ResultFileError, match="checksum"):
        kdsim.load_result(tmp_path / "t")
    small_result.save(tmp_path / "r")
    npz = tmp_path / "r" / NPZ_NAME
    blob = npz.read_bytes()
    npz.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ResultFileError, match="checksum"):
        kdsim.load_result(tmp_path / "r")
    small_result.save(tmp_path / "s")
    header = json.loads((tmp_path / "s" / JSON_NAME).read_text())
    header["schema"] = "kdsim.result/999"
    (tmp_path / "s" / JSON_NAME).write_text(json.dumps(header))
    with pytest.raises(ResultFileError, match="schema"):
        kdsim.load_result(tmp_path / "s")
    with pytest.raises(ResultFileError, match="missing"):
        kdsim.load_result(tmp_path / "nothing")
