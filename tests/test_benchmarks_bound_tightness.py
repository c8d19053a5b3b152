"""The bound-tightness benchmark's own logic: which bound it names tightest valid."""

import os
import sys

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def bt():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import bound_tightness as module
    finally:
        sys.path.pop(0)
    return module


def _table(rows):
    return pd.DataFrame(rows, columns=["bound", "value", "truth", "valid", "loss", "assumption"]
                        ).set_index("bound")


def test_tightest_valid_compares_ratios_on_each_loss_and_skips_unusable_rows(bt):
    rows = _table([
        # smallest value, but on the squared loss its ratio is 4.0
        ("F_B0_upper", 0.40, 0.10, 1.0, "squared", np.nan),
        # the tightest ratio (2.0) on the clipped loss: named although its value is larger
        ("ldcmi_kl_upper", 0.50, 0.25, 1.0, "clipped", np.nan),
        # smaller ratios, each unusable: fails on its truth / assumption not met /
        # infinite / non-positive truth
        ("B0_upper", 0.11, 0.10, 0.0, "squared", np.nan),
        ("incoherence_upper", 0.30, 0.25, 1.0, "clipped", 0.0),
        ("B0_proj_upper", np.inf, 0.10, 1.0, "squared", np.nan),
        ("ecmi_upper", 0.01, -0.02, 1.0, "clipped", np.nan),
    ])
    assert bt.tightest_valid(rows) == ("ldcmi_kl_upper", "clipped", 2.0)
    assert bt.tightest_valid(rows.loc[["B0_upper", "B0_proj_upper"]])[0] == "-"
    # vacuous: at or above the loss's range (clip B for clipped, 1 for 0-1; squared unbounded)
    assert bt.vacuous({"value": bt.LOSS_CLIP, "loss": "clipped"})
    assert not bt.vacuous({"value": 0.99, "loss": "01"})
    assert not bt.vacuous({"value": 1e6, "loss": "squared"})
