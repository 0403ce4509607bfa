"""Refactors keep the numbers: two presets and a scanned deep net against numbers stored
from main before the model registry (``data/make_reference.py`` wrote them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data.make_reference import CASES, records

REFERENCE = np.load(Path(__file__).parent / "data" / "reference.npz")


@pytest.mark.parametrize("case", sorted(CASES))
def test_numbers_match_the_stored_reference(case):
    got = records(CASES[case])
    for key, value in got.items():
        want = REFERENCE[f"{case}/{key}"]
        assert value.shape == want.shape, key
        np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-7, equal_nan=True,
                                   err_msg=f"{case}: {key}")
