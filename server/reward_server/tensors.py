"""Ragged rows as the padded arrays Triton tensors carry."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_rows(rows: Sequence[np.ndarray], fill: float) -> np.ndarray:
    """Rows of different lengths as one array [len(rows), longest, ...], right-padded with `fill`."""
    longest = max(len(row) for row in rows)
    first = np.asarray(rows[0])
    padded = np.full((len(rows), longest, *first.shape[1:]), fill, dtype=first.dtype)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    return padded
