"""Labels and ground truths as references, in every adapter (`references_of`):
a value that is no answer is refused, never turned into a reference by `str`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepcredit_client.adapters._common import references_of


@pytest.mark.parametrize(
    "label", [False, [False], [True, "5"], math.nan, [math.inf], float("-inf"), {"answer": "5"}, [["5"]]]
)
def test_adapters_refuse_a_label_that_is_no_answer(label):
    # `str(False)` would make "False" a reference, `str(nan)` "nan", a dict its keys.
    with pytest.raises(ValueError):
        references_of(label)


def test_adapters_still_take_text_numbers_and_lists():
    assert references_of(5) == ["5"]
    assert references_of(2.5) == ["2.5"]
    assert references_of(["5", 5, " ", None]) == ["5", "5"]


def test_numpy_values_as_verl_hands_them_over():
    assert references_of(np.array(["5", "five"])) == ["5", "five"]
    assert references_of(np.int64(5)) == ["5"]
    with pytest.raises(ValueError):
        references_of(np.array([np.nan]))
    with pytest.raises(ValueError):
        references_of(np.bool_(False))
