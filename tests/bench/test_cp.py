"""`python -m lctk.bench cp` measures what it claims: split over 2 processes, the recurrent layers send the same
bytes at any T, attention's keys and values grow with T."""

import pytest

from lctk.bench import cp

pytestmark = pytest.mark.slow


def test_recurrent_bytes_do_not_grow_with_the_row():
    short, long = cp.measure(1024, 2), cp.measure(2048, 2)
    for letter in "MSBC":
        assert long["sent"][letter] == short["sent"][letter] > 0, letter
    assert long["sent"]["A"] == 2 * short["sent"]["A"]
