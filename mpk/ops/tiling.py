"""Splitting of one dimension into tiles."""

from __future__ import annotations

import math


def split(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``parts`` intervals whose widths are multiples of
    ``align``, except a remainder interval at the end when ``n`` does not divide evenly.
    """
    parts = max(1, min(parts, math.ceil(n / align)))
    width = math.ceil(math.ceil(n / parts) / align) * align
    return [(lo, min(lo + width, n)) for lo in range(0, n, width)]


def split_segments(segments: list[int], parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Split the concatenation of ``segments`` so that no interval crosses a segment
    boundary. Each segment gets a share of ``parts`` in proportion to its size, at least one.
    """
    total = sum(segments)
    out: list[tuple[int, int]] = []
    offset = 0
    for size in segments:
        share = max(1, round(parts * size / total))
        out.extend((offset + lo, offset + hi) for lo, hi in split(size, share, align))
        offset += size
    return out


def column_parts(n: int, plan_workers: int, min_columns: int) -> int:
    """Return how many column tiles to cut ``n`` columns into: one per worker, unless that
    would make tiles narrower than ``min_columns``.
    """
    return max(1, min(plan_workers, n // max(min_columns, 1)))
