"""Landmark files: a CSV with a header row naming the columns ``X,Y[,Z]`` (physical coordinates in
mm; pixels for photos); other columns are ignored, blank lines allowed."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .errors import ImageError, missing


def read_points(path: str | Path, ndim: int) -> np.ndarray:
    """Points CSV: a header row with columns ``X,Y[,Z]`` (physical; pixels for photos), others ignored.

    Raises :class:`ImageError` naming the file (and the row) for anything it cannot use."""
    p = Path(path)
    if not p.exists():
        raise missing(p, "points file")
    names = ["X", "Y", "Z"][:ndim]
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise ImageError(f"{p}: cannot read it as a CSV text file ({type(e).__name__}); "
                         f"save the points as CSV with a header row {','.join(names)}") from None
    if not rows:
        raise ImageError(f"{p}: empty points file; expected a header row with columns {','.join(names)}")
    header = [h.strip().upper() for h in rows[0]]
    missing_cols = [n for n in names if n not in header]
    if missing_cols:
        raise ImageError(f"{p}: no column(s) {', '.join(missing_cols)} in the header {rows[0]}; "
                         f"a {ndim}D points file needs columns {','.join(names)}")
    idx = [header.index(n) for n in names]
    pts = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue  # blank lines are allowed
        try:
            values = [float(row[i]) for i in idx]
        except (ValueError, IndexError):
            raise ImageError(f"{p}: row {number} {row} has no number in column(s) {','.join(names)}; "
                             "fix or delete that row") from None
        if not np.isfinite(values).all():
            raise ImageError(f"{p}: row {number} {row} is not finite; fix or delete that row")
        pts.append(values)
    return np.array(pts, dtype=np.float64).reshape(-1, ndim)
