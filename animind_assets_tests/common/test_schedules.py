"""The one warm-up/cosine LR rule every trainer uses (``lib.common.schedules``)."""

import math

import pytest

from animind_assets.lib.common.schedules import progress_after_warmup, warmup_cosine


def test_warmup_then_constant_or_cosine_to_the_floor():
    assert warmup_cosine(0, 10, None) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(500, 10, None) == 1.0  # constant after warm-up
    assert warmup_cosine(0, 0, None) == 1.0  # no warm-up
    assert warmup_cosine(20, 10, 0.5, min_ratio=0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert warmup_cosine(20, 10, 1.0, min_ratio=0.05) == warmup_cosine(20, 10, 7.0, min_ratio=0.05) == pytest.approx(0.05)
    assert warmup_cosine(20, 10, 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_progress_counts_post_warmup_steps_and_is_clipped():
    assert progress_after_warmup(5, 10, 110) == 0.0
    assert progress_after_warmup(60, 10, 110) == pytest.approx(0.5)
    assert progress_after_warmup(500, 10, 110) == 1.0
    assert progress_after_warmup(3, 0, 0) == 1.0  # degenerate plan: no division by zero
