"""GLM's mask, written once in minglm/masks.py, and every place that draws or uses a mask agrees with it."""

from __future__ import annotations

import numpy as np
import pytest
from known_answers import FIG2_MASK

from minglm.data import dense_mask
from minglm.exercises import reference_glm_mask
from minglm.masks import glm_mask


def test_figure_2():
    np.testing.assert_array_equal(glm_mask(np, [5], 10)[0, 0], FIG2_MASK)
    np.testing.assert_array_equal(glm_mask(np, 5, 10, 10)[0, 0], FIG2_MASK)  # one int works as well as (B,)


@pytest.mark.parametrize("sep", [0, 3, 7])
def test_decoding_offset_is_the_last_rows_of_the_whole_mask(sep):
    """With a cache, the Tq new queries are the last Tq of Tk positions: their rows of the full (Tk, Tk) mask."""
    full = glm_mask(np, [sep], 7)[0, 0]
    for Tq in (1, 2, 7):
        np.testing.assert_array_equal(glm_mask(np, [sep], Tq, 7)[0, 0], full[7 - Tq:])


def test_batch_and_lengths():
    m = glm_mask(np, np.array([2, 4]), 5, lengths=np.array([5, 3]))
    assert m.shape == (2, 1, 5, 5) and m.dtype == bool
    np.testing.assert_array_equal(m[0, 0], glm_mask(np, [2], 5)[0, 0])
    assert not m[1, 0, 3:].any()  # the padded rows see nothing
    np.testing.assert_array_equal(m[1, 0, :3], glm_mask(np, [4], 5)[0, 0, :3])


def test_the_other_views_are_this_mask():
    seps = np.array([0, 3, 6])
    np.testing.assert_array_equal(dense_mask(seps, 6), glm_mask(np, seps, 6)[:, 0])
    np.testing.assert_array_equal(reference_glm_mask(6, 3), glm_mask(np, [3], 6)[0, 0])
