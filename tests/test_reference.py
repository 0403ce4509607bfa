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
        # Entries that are zero in exact arithmetic (the bias before a batch norm has no
        # gradient) come out as float32 rounding noise of the array's largest terms,
        # which moves with the XLA version: absolute tolerance at that noise's scale.
        finite = np.abs(want[np.isfinite(want)]) if want.dtype.kind == "f" else np.zeros(1)
        noise = 1e-6 * float(finite.max(initial=0.0))
        np.testing.assert_allclose(value, want, rtol=2e-5, atol=max(1e-7, noise),
                                   equal_nan=True, err_msg=f"{case}: {key}")
