"""Boxes: the regions of a tensor that a task reads or writes.

A box is a tuple of half-open ``(lo, hi)`` intervals, one per tensor dimension.
Every access the compiler reasons about is a box, so overlap and containment are
cheap to test, and numpy can test many boxes at once.
"""

from __future__ import annotations

import numpy as np

Box = tuple[tuple[int, int], ...]


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


def box_volume(box: Box) -> int:
    volume = 1
    for lo, hi in box:
        volume *= max(hi - lo, 0)
    return volume


def box_intersection(a: Box, b: Box) -> Box | None:
    out = tuple((max(alo, blo), min(ahi, bhi)) for (alo, ahi), (blo, bhi) in zip(a, b))
    if any(lo >= hi for lo, hi in out):
        return None
    return out


def format_box(box: Box) -> str:
    return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in box) + "]"


def boxes_to_arrays(boxes: list[Box]) -> tuple[np.ndarray, np.ndarray]:
    """Stack boxes into ``lo`` and ``hi`` arrays of shape [n, ndim]."""
    array = np.asarray(boxes, dtype=np.int64)
    return array[:, :, 0], array[:, :, 1]


def overlap_matrix(lo_a: np.ndarray, hi_a: np.ndarray, lo_b: np.ndarray, hi_b: np.ndarray) -> np.ndarray:
    """Return a [len(a), len(b)] boolean matrix: box a[i] overlaps box b[j]."""
    lo = np.maximum(lo_a[:, None, :], lo_b[None, :, :])
    hi = np.minimum(hi_a[:, None, :], hi_b[None, :, :])
    return np.all(lo < hi, axis=2)


def covered_mask(lo_a: np.ndarray, hi_a: np.ndarray, lo_b: np.ndarray, hi_b: np.ndarray) -> np.ndarray:
    """Return, per box of a, whether the boxes of b cover it completely.

    The boxes of b must be pairwise disjoint (the tiles of one operator are), so
    summing the volumes of the intersections measures the covered volume exactly.
    """
    lo = np.maximum(lo_a[:, None, :], lo_b[None, :, :])
    hi = np.minimum(hi_a[:, None, :], hi_b[None, :, :])
    covered = np.prod(np.clip(hi - lo, 0, None), axis=2).sum(axis=1)
    return covered == np.prod(hi_a - lo_a, axis=1)
