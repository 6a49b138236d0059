"""Runs of one viewer's session (shared by the Register and QA widgets) and the result layers of a run.

The heavy arrays of a run (warped labels, grid) are computed in the worker thread by :func:`run_job`;
:func:`result_layers` only packs them into layer-data tuples for the main thread to add.
"""
from __future__ import annotations

import csv
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Optional, Sequence

import numpy as np
from psygnal import Signal

from .. import qa
from ..api import RegistrationResult, iter_register
from ..image import Image
from ..progress import Cancelled, Progress
from .layers import LayerData, image_layer, points_layer, run_metadata

COLUMNS = ("run", "method", "checkpoint", "io steps", "seconds", "Dice", "TRE mean", "TRE max", "folds %")


@dataclass
class RunProducts:
    """What the worker thread hands back: the result plus the arrays of the optional layers."""

    result: RegistrationResult
    warped_labels: Optional[Image] = None
    warped_points: Optional[np.ndarray] = None  # physical (x, y[, z]), moving landmarks in the fixed frame
    grid: Optional[np.ndarray] = None


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


def grid_array(result: RegistrationResult, spacing: float, axes: Sequence[int]) -> np.ndarray:
    """Deformation grid on the fixed grid: lines of the given array ``axes`` (the displayed plane),
    so every slice of a 3D volume shows its own in-plane grid -> float32 0/1 of the fixed shape."""
    return qa.grid_image(result.field.disp_vox(), spacing, axes=tuple(axes))


def run_job(moving: Image, fixed: Image, cancelled: Callable[[], bool], labels: Optional[Image] = None,
            points: Optional[np.ndarray] = None, grid_spacing: float = 8.0, grid_axes: Sequence[int] = (0, 1),
            **kwargs: Any) -> Generator[Progress, None, RunProducts | Failed]:
    """The worker-thread body: :func:`iter_register` with previews, then the derived arrays.

    Returns :class:`RunProducts`, or :class:`Failed` with the :class:`Cancelled` or the exception that
    stopped it, so that nothing escapes into napari's thread machinery (the widget reports it)."""
    try:
        result = yield from iter_register(moving, fixed, cancel=cancelled, previews=True, **kwargs)
        out = RunProducts(result)
        steps = (("warped_labels", "warping labels", lambda: None if labels is None else result.warp_labels(labels)),
                 ("warped_points", "mapping points",
                  lambda: None if points is None else result.map_points_inverse(points)),
                 ("grid", "drawing grid", lambda: grid_array(result, grid_spacing, grid_axes)))
        for attr, stage, work in steps:
            yield Progress(f"finishing: {stage}", 0, 1)
            if cancelled():
                raise Cancelled("registration cancelled")
            setattr(out, attr, work())
        return out
    except Exception as e:  # Cancelled included
        return Failed(e)


def result_layers(run: Run, products: RunProducts, points_style: Optional[dict] = None) -> dict[str, LayerData]:
    """Role -> layer-data tuple for every result layer, all placed on the fixed image's grid."""
    r = products.result
    meta = (lambda role: {"metadata": run_metadata(run.number, role, r.field)})
    name = run.name
    geom = r.fixed.geometry
    out = {"warped": image_layer(r.warped, f"{name} warped", **meta("warped"),
                                 **({} if r.warped.rgb else {"colormap": "green", "blending": "additive"}))}
    if products.warped_labels is not None:
        out["labels"] = image_layer(products.warped_labels, f"{name} warped labels", "labels", opacity=0.5,
                                    **meta("labels"))
    if products.warped_points is not None:
        out["points"] = points_layer(products.warped_points, geom, f"{name} warped points",
                                     **(points_style or {}), **meta("points"))
    if products.grid is not None:
        out["grid"] = image_layer(Image(products.grid, geom), f"{name} grid", colormap="yellow",
                                  blending="additive", contrast_limits=(0, 1), **meta("grid"))
    cm = qa.jacobian_colormap(0.0, 2.0)
    out["jacobian"] = image_layer(r.jacobian, f"{name} Jacobian", visible=False, opacity=0.7,
                                  colormap=_napari_colormap(cm), contrast_limits=cm["contrast_limits"],
                                  **meta("jacobian"))
    out["magnitude"] = image_layer(Image(r.field.magnitude(), geom), f"{name} |displacement|",
                                   colormap="inferno", visible=False, **meta("magnitude"))
    return out


def _napari_colormap(cm: dict) -> Any:
    from napari.utils import Colormap

    # qa's piecewise colours: blue (shrink) -> white at det 1 -> red (grow), and a green band for det <= 0
    return Colormap(colors=cm["colors"], controls=cm["controls"], name="jacobian (fold = green)")
