"""The one intensity normaliser: robust percentiles to [0, 1] (registration inputs, training volumes,
QA views and 8-bit exports all go through it)."""
from __future__ import annotations

import numpy as np


def normalise(array: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clip to the ``percentiles`` and scale to [0, 1], float32 (NaNs ignored when finding them).

    Mostly-constant images fall back to the full range; a constant image gives zeros."""
    x = np.asarray(array)
    if not x.size:
        return x.astype(np.float32)
    lo, hi = np.nanpercentile(x, percentiles)
    if hi <= lo:
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if not hi > lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0, 1).astype(np.float32)
