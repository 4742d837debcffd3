"""Sharing maps and schedules (Relaxed Recursive Transformers): the maps of the paper, refusals."""

from __future__ import annotations

import pytest

from loopify.nn import schedule, sharing_map
from loopify.nn.sharing import default_blocks


def test_sharing_maps_follow_the_papers():
    assert sharing_map("cycle", 6, 3) == [0, 1, 2, 0, 1, 2]
    assert sharing_map("sequence", 6, 3) == [0, 0, 1, 1, 2, 2]
    assert sharing_map("middle-cycle", 6, 4) == [0, 1, 2, 1, 2, 3]
    assert sharing_map("middle-sequence", 6, 4) == [0, 1, 1, 2, 2, 3]
    assert schedule("cycle", 6, 3, 1) == [0, 1, 2]
    assert schedule("sequence", 6, 3, 1) == [0, 2, 4]
    assert schedule("middle-cycle", 6, 4, 1) == [0, 1, 2, 5]
    assert default_blocks(6) == 3 and default_blocks(4) == 2 and default_blocks(2) == 1 and default_blocks(5) == 1


@pytest.mark.parametrize("kind,l,k", [("cycle", 6, 4), ("sequence", 5, 2), ("middle-cycle", 6, 2), ("middle-cycle", 7, 4)])
def test_sharing_maps_refuse_uneven_splits(kind, l, k):
    with pytest.raises(ValueError):
        sharing_map(kind, l, k)


