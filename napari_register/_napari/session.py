"""Runs of one viewer's session (shared by the Register and QA widgets) and the result layers of a run.

The heavy arrays of a run (warped labels, live previews) are computed in the worker thread by
:func:`run_job`; :func:`result_view.result_layers` only packs them into layer-data tuples for the
main thread to add.
"""
from __future__ import annotations

import csv
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Optional, Sequence

import numpy as np
import torch
from psygnal import Signal

from ..api import RegistrationResult, iter_register
from ..image import Image
from ..progress import Cancelled, Progress

COLUMNS = ("run", "method", "checkpoint", "io steps", "seconds", "Dice", "TRE mean", "TRE max", "folds %")


@dataclass
class RunProducts:
    """What the worker thread hands back: the result plus the arrays of the optional layers."""

    result: RegistrationResult
    warped_labels: Optional[Image] = None
    warped_points: Optional[np.ndarray] = None  # physical (x, y[, z]), moving landmarks in the fixed frame


@dataclass
class Failed:
    """A job that stopped: ``error`` is :class:`Cancelled` or what went wrong. (A worker must not
    *return* an exception: napari's thread machinery would take it for its own failure.)"""

    error: Exception


@dataclass
class Run:
    """One registration of the session, its layers (role -> layer) and the QA numbers measured on it."""

    number: int
    result: RegistrationResult
    fixed_layer: Any
    moving_layer: Any
    options: Optional[dict] = None
    parent: Optional[int] = None  # the run this one continued (instance optimisation)
    layers: dict[str, Any] = field(default_factory=dict)
    grid_spacing: float = 8.0
    grid_stale: bool = True  # the grid layer holds no lines yet (drawn when shown)
    dice: Optional[float] = None
    tre: Optional[tuple[float, float]] = None  # mean, max

    @property
    def name(self) -> str:
        return f"{self.result.method} #{self.number}"

    def row(self) -> dict[str, Any]:
        r = self.result
        label = f"#{self.number}" + (f" (from #{self.parent})" if self.parent else "")
        fmt = (lambda v, n: "" if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, n))
        return dict(zip(COLUMNS, (label, r.method, r.checkpoint or "", r.io_steps, round(r.seconds, 1),
                                  fmt(self.dice, 4), fmt(self.tre and self.tre[0], 3),
                                  fmt(self.tre and self.tre[1], 3), fmt(100 * r.fold_fraction, 4))))


class Session:
    """Every run made in one viewer; ``changed`` fires when a run is added or measured."""

    changed = Signal()

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self._counter = 0

    def next_number(self) -> int:
        self._counter += 1
        return self._counter

    def add(self, run: Run) -> None:
        self.runs.append(run)
        self.changed.emit()

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.runs]

    def save_csv(self, path: str | Path) -> Path:
        from ..outputs import atomic_path

        p = Path(path)
        with atomic_path(p) as tmp, open(tmp, "w", newline="") as f:  # no half-written table
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows())
        return p


_SESSIONS: "weakref.WeakKeyDictionary[Any, Session]" = weakref.WeakKeyDictionary()


def session_for(viewer: Any) -> Session:
    """The session of ``viewer`` (created on first use, dropped with the viewer)."""
    if viewer not in _SESSIONS:
        _SESSIONS[viewer] = Session()
    return _SESSIONS[viewer]


def default_grid_spacing(shape: Sequence[int]) -> float:
    """About 16 grid cells across the largest axis, at least 4 voxels each."""
    return float(max(4, round(max(shape) / 16)))


def run_job(moving: Image, fixed: Image, cancelled: Callable[[], bool], labels: Optional[Image] = None,
            points: Optional[np.ndarray] = None, threads: Optional[int] = None,
            **kwargs: Any) -> Generator[Progress, None, RunProducts | Failed]:
    """The worker-thread body: :func:`iter_register` with its live previews, then the warped labels
    and points; its last step is the pipeline's ``"done"``. ``threads``: torch's CPU threads here
    (a pooled worker thread keeps the count it had when created, not the main thread's current one).

    Returns :class:`RunProducts`, or :class:`Failed` with the :class:`Cancelled` or the exception that
    stopped it, so that nothing escapes into napari's thread machinery (the widget reports it)."""
    if threads:
        torch.set_num_threads(threads)
    steps = iter_register(moving, fixed, cancel=cancelled, previews=True, **kwargs)
    try:
        done = None
        last = Progress("finishing", 0, 1)  # the latest step with a share done, which the finishing keeps
        while True:
            try:
                p = next(steps)
            except StopIteration as stop:
                result = stop.value
                break
            if p.stage == "done":  # held back until the labels and points are warped too
                done = p
                continue
            last = p if p.fraction is not None else last
            yield p
        out = RunProducts(result)
        for attr, stage, source, fn in (("warped_labels", "warping labels", labels, result.warp_labels),
                                        ("warped_points", "mapping points", points, result.map_points_inverse)):
            if source is None:
                continue
            yield Progress(f"finishing: {stage}", 0, 1, fraction=last.fraction, stage_index=last.stage_index,
                           stages=last.stages)
            if cancelled():
                raise Cancelled("registration cancelled")
            setattr(out, attr, fn(source))
        if done is not None:
            yield done
        return out
    except Exception as e:  # Cancelled included
        return Failed(e)
    finally:
        steps.close()
