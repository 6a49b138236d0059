"""The one-file QA figure (``qa.png``) of a registration, written by the command line.

One row per plane (2D: one row; 3D: the middle axial, coronal and sagittal slices), four panels per
row: *before* (fixed in magenta, the moving image as it was in green: grey where they agree),
*after* (the same with the warped image), the fixed image with the warped grid, and the Jacobian
determinant on a log scale centred at 1 with folds (det J <= 0) in green. The suptitle carries the
run's numbers (:func:`qa_title`) and the one fold figure: the whole volume's (:func:`fold_text`).

matplotlib is imported inside :func:`build_qa_figure` only, on a bare Agg figure (no pyplot), so
importing this module, or using it inside napari, switches no backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from .intensity import normalise
from .metrics import fold_fraction
from .qa import JACOBIAN_COLORS, jacobian_rgb, slice_coords

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLANES = ((0, "axial"), (1, "coronal"), (2, "sagittal"))  # array axis held fixed in each plane
PANEL_INCHES = (4.5, 3.0)  # one row (2D) / three rows (3D)
DPI = 80  # a 3D panel of ~240 px: about one screen pixel per voxel of a brain slice
GRID_COLOR = (1.0, 0.8, 0.0)
FOLD_RINGS = 20  # a slice with at most this many fold voxels gets them circled, else dotted


# ------------------------------------------------------------------------------------ texts

def _percent(fraction: float) -> str:
    """Two significant digits, so that 0.006 % does not print as 0.01 % or 0.000 %."""
    pct = 100.0 * fraction
    return "0" if pct == 0 else f"{pct:.2g}" if pct < 10 else f"{pct:.1f}"


def fold_text(jac: np.ndarray) -> str:
    """The figure's one statement on folding: voxels with det J <= 0 over the whole volume."""
    n = int(np.count_nonzero(np.asarray(jac) <= 0))
    if n == 0:
        return "no folds (det J > 0 everywhere)"
    return f"folds (det J \u2264 0): {_voxels(n)} = {_percent(fold_fraction(jac))} % of the volume"


def _voxels(n: int, what: str = "voxel") -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def qa_title(metrics: Mapping[str, Any], unit: str = "mm") -> str:
    """``method, seconds | Dice before -> after | TRE before -> after`` from a run's ``metrics.json``
    keys (``method``, ``seconds``, ``dice_mean(_before)``, ``tre_before``/``tre_after``; missing ones
    are left out). ``unit``: the TRE's unit (the points' physical units)."""
    parts = [", ".join(str(v) for v in (metrics.get("method"), _seconds(metrics.get("seconds"))) if v)]
    for name, before, after, fmt, suffix in (("Dice", "dice_mean_before", "dice_mean", ".3f", ""),
                                             ("TRE", "tre_before", "tre_after", ".2f", f" {unit}")):
        if after in metrics:
            start = f"{metrics[before]:{fmt}} \u2192 " if before in metrics else ""
            parts.append(f"{name} {start}{metrics[after]:{fmt}}{suffix}")
    return "  |  ".join(p for p in parts if p)


def _seconds(s: Optional[float]) -> str:
    return "" if s is None else f"{s:.1f} s"


# ------------------------------------------------------------------------------ colour scale

def jacobian_log2_range(jac: np.ndarray, percentile: float = 95.0, lo: float = 1.0, hi: float = 3.0) -> float:
    """Half-width ``R`` of the symmetric log2 scale ``2**-R .. 2**R`` of the Jacobian panels.

    The ``percentile`` of |log2 det J| over the unfolded voxels, rounded up to a half, kept within
    ``[lo, hi]``: never narrower than 0.5 .. 2, so a gentle warp stays pale, and at most 1/8 .. 8.
    """
    j = np.asarray(jac).ravel()
    j = j[:: max(1, j.size // (1 << 20))]  # a million voxels fix a percentile well enough
    j = j[np.isfinite(j) & (j > 0)]
    if not j.size:
        return lo
    r = float(np.percentile(np.abs(np.log2(j)), percentile))
    return float(np.clip(math.ceil(2 * r - 1e-9) / 2, lo, hi))


def _log_ticks(r: float) -> tuple[list[float], list[str]]:
    """Colourbar ticks at the powers of two within ``[-r, r]`` (log2 units), labelled as det J."""
    ks = range(-int(math.floor(r)), int(math.floor(r)) + 1)
    return [float(k) for k in ks], [f"{2.0 ** k:g}" for k in ks]


# ----------------------------------------------------------------------------------- planes

@dataclass(frozen=True)
class _Plane:
    name: str                 # row label: "" in 2D, "axial 72" in 3D
    axis: Optional[int]       # array axis held fixed (None: the 2D image itself)
    index: int
    shown: tuple[int, int]    # array axes of the slice's rows and columns
    aspect: float
    origin: str
    k: int                    # k x k voxels make one drawn pixel: the panel shows no finer detail

    def take(self, a: np.ndarray) -> np.ndarray:
        return a if self.axis is None else np.take(a, self.index, axis=self.axis)

    def reduce(self, a: np.ndarray) -> np.ndarray:
        """Block means of ``k x k`` voxels of a slice (float32); rows and columns that fill no block are
        dropped. Drawing a photo at panel size costs a quarter or less, and looks the same."""
        a = np.asarray(a, dtype=np.float32)
        if self.k == 1:
            return a
        h, w = (a.shape[0] // self.k) * self.k, (a.shape[1] // self.k) * self.k
        return a[:h, :w].reshape(h // self.k, self.k, w // self.k, self.k, *a.shape[2:]).mean((1, 3))

    def show(self, reduced_shape: Sequence[int]) -> dict[str, Any]:
        """imshow's arguments: a reduced slice still spans the slice's voxel coordinates, where the
        grid's contours and the fold marks are drawn."""
        h, w = reduced_shape[0] * self.k, reduced_shape[1] * self.k
        extent = (-0.5, w - 0.5, h - 0.5, -0.5) if self.origin == "upper" else (-0.5, w - 0.5, -0.5, h - 0.5)
        # antialiased: what is still larger than the panel shrinks without aliasing speckle
        return dict(aspect=self.aspect, origin=self.origin, extent=extent, interpolation="antialiased")


def _planes(shape: Sequence[int], spacing_zyx: np.ndarray, panel_px: int) -> list[_Plane]:
    if len(shape) == 2:
        return [_Plane("", None, 0, (0, 1), spacing_zyx[0] / spacing_zyx[1], "upper", max(1, max(shape) // panel_px))]
    out = []
    for axis, name in PLANES:
        index = shape[axis] // 2
        shown = tuple(k for k in range(3) if k != axis)
        # z up in the coronal and sagittal views
        out.append(_Plane(f"{name} {index}", axis, index, shown, spacing_zyx[shown[0]] / spacing_zyx[shown[1]],
                          "upper" if axis == 0 else "lower", max(1, max(shape[k] for k in shown) // panel_px)))
    return out


def _shown_slices(volume: np.ndarray, planes: Sequence[_Plane]) -> list[np.ndarray]:
    """The planes' slices at panel size, normalised together by percentiles (:func:`qa.normalize`'s
    1 / 99): the contrast of what is shown, without a float copy of the whole volume."""
    slices = [p.reduce(p.take(volume)) for p in planes]
    flat = normalise(np.concatenate([s.ravel() for s in slices]), (1.0, 99.0))
    return [part.reshape(s.shape) for part, s in zip(np.split(flat, np.cumsum([s.size for s in slices])[:-1]), slices)]


def overlay(fixed_n: np.ndarray, other_n: np.ndarray) -> np.ndarray:
    """Fixed in magenta, the other image in green (both in [0, 1]): grey where they agree -> RGB."""
    return np.stack([fixed_n, other_n, fixed_n], -1)


# ----------------------------------------------------------------------------------- figure

def build_qa_figure(fixed: np.ndarray, warped: np.ndarray, disp_vox: Optional[np.ndarray],
                    jac: Optional[np.ndarray], title: str = "", spacing_xyz: Optional[Sequence[float]] = None,
                    moving_before: Optional[np.ndarray] = None, log2_range: Optional[float] = None) -> "Figure":
    """The QA figure as a matplotlib ``Figure`` (see :func:`qa_figure`). Each panel's axes carry its
    column as label (``before``, ``after``, ``grid``, ``jacobian``) for tests and callers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fixed = np.asarray(fixed)
    spacing_zyx = _checked_spacing(fixed, spacing_xyz, warped=warped, moving_before=moving_before,
                                   disp_vox=disp_vox, jac=jac)
    inches = PANEL_INCHES[fixed.ndim == 3]
    planes = _planes(fixed.shape, spacing_zyx, int(inches * DPI))
    step_mm = max(np.asarray(fixed.shape) * spacing_zyx) / 12  # ~12 grid cells, square in mm
    grid_step = np.maximum(step_mm / spacing_zyx, 2.0)
    fixed_s, warped_s = _shown_slices(fixed, planes), _shown_slices(warped, planes)
    before_s = None if moving_before is None else _shown_slices(moving_before, planes)
    r = None if jac is None else jacobian_log2_range(jac) if log2_range is None else float(log2_range)

    headers = {"before": "before: fixed (magenta) / moving (green)",
               "after": "after: fixed / warped" if before_s is not None else "after: fixed (magenta) / warped (green)",
               "grid": "fixed + warped grid" if disp_vox is not None else "fixed (no displacement field)",
               "jacobian": "det J" if jac is not None else "no Jacobian"}
    columns = [c for c in headers if c != "before" or before_s is not None]
    # the extra inches leave room for the two-line suptitle and the colour bar
    fig = Figure(figsize=(inches * len(columns) + 0.9, inches * len(planes) + 0.7), layout="constrained")
    FigureCanvasAgg(fig)
    axs = fig.subplots(len(planes), len(columns), squeeze=False)
    for row, plane in enumerate(planes):
        ax = dict(zip(columns, axs[row]))
        show = plane.show(fixed_s[row].shape)
        for col, a in ax.items():
            a.set_label(col)
            a.set_xticks([])
            a.set_yticks([])
            if row == 0:
                a.set_title(headers[col], fontsize=9)
        axs[row, 0].set_ylabel(plane.name, fontsize=9)
        if before_s is not None:
            ax["before"].imshow(overlay(fixed_s[row], before_s[row]), **show)
        ax["after"].imshow(overlay(fixed_s[row], warped_s[row]), **show)
        ax["grid"].imshow(fixed_s[row], cmap="gray", vmin=0, vmax=1, **show)
        if disp_vox is not None:
            _draw_grid(ax["grid"], disp_vox, plane, grid_step)
        if r is not None:
            _draw_jacobian(ax["jacobian"], plane, plane.take(np.asarray(jac)), r)
    lines = [title] if title else []
    if r is not None:
        _colour_bar(fig, list(axs[:, -1]), r)
        lines.append(fold_text(jac))
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def _checked_spacing(fixed: np.ndarray, spacing_xyz: Optional[Sequence[float]], **on_fixed_grid: Any) -> np.ndarray:
    """Array-order spacing, after checking that every given array lies on the fixed grid."""
    d = fixed.ndim
    if d not in (2, 3):
        raise ValueError(f"qa_figure draws 2D or 3D images, got shape {fixed.shape}")
    for name, arr in on_fixed_grid.items():
        shape = fixed.shape + (d,) if name == "disp_vox" else fixed.shape
        if arr is not None and np.shape(arr) != shape:
            raise ValueError(f"qa_figure: {name} has shape {np.shape(arr)}, expected {shape} (fixed grid)")
    spacing_zyx = np.ones(d) if spacing_xyz is None else np.asarray(spacing_xyz, dtype=np.float64)[::-1]
    if spacing_zyx.size != d:
        raise ValueError(f"qa_figure: spacing_xyz {tuple(spacing_xyz)} does not match a {d}D image")
    return spacing_zyx


def _draw_jacobian(ax: Any, plane: _Plane, jac_slice: np.ndarray, r: float) -> None:
    shown = plane.reduce(jac_slice)  # block means of det J; the fold marks come from every voxel
    ax.imshow(jacobian_rgb(shown, 2.0 ** -r, 2.0 ** r, scale="log"), **plane.show(shown.shape))
    folds_here = _mark_folds(ax, jac_slice)
    if folds_here:  # the slice's own count, said to be the slice's (the whole volume's is in the title)
        ax.set_xlabel(f"this slice: {_voxels(folds_here, 'fold voxel')}"
                      + (" (circled)" if folds_here <= FOLD_RINGS else ""), fontsize=8)


def _colour_bar(fig: Any, axes: list, r: float) -> None:
    """One bar for the Jacobian column: jacobian_rgb's own colours on a log2 axis labelled in det J,
    the extension below it in the fold colour."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    colours = jacobian_rgb(np.logspace(-r, r, 256, base=2.0), 2.0 ** -r, 2.0 ** r, scale="log") / 255.0
    cmap = ListedColormap(colours).with_extremes(under=JACOBIAN_COLORS["fold"])
    ticks, labels = _log_ticks(r)
    bar = fig.colorbar(ScalarMappable(cmap=cmap, norm=Normalize(-r, r)), ax=axes, extend="min", ticks=ticks,
                       shrink=0.6, aspect=30)
    bar.ax.set_yticklabels(labels)
    bar.set_label("det J (log scale): < 1 shrinks, > 1 grows", fontsize=8)
    bar.ax.text(0.5, -0.04, "fold\n(det J\n\u2264 0)", transform=bar.ax.transAxes, ha="center", va="top",
                fontsize=7, color="green")


def _draw_grid(ax: Any, disp_vox: np.ndarray, plane: _Plane, grid_step: np.ndarray) -> None:
    """The moving grid warped into the plane: contours of the slice's moving coordinates, smooth at any
    zoom (unlike the voxel mask of :func:`qa.grid_image`, meant for napari layers), on every ``k``-th
    voxel of the slice like the images beneath."""
    if plane.axis is None:
        disp = np.asarray(disp_vox)
        coords = np.moveaxis(np.indices(disp.shape[:-1], dtype=np.float32), 0, -1) + disp
    else:
        coords = slice_coords(disp_vox, plane.axis, plane.index)
    k = plane.k
    rows, cols = np.arange(0, coords.shape[0], k), np.arange(0, coords.shape[1], k)
    for axis in plane.shown:
        c = coords[::k, ::k, axis] / grid_step[axis]
        levels = np.arange(np.ceil(c.min()), np.floor(c.max()) + 1)
        if levels.size and min(c.shape) >= 2:
            ax.contour(cols, rows, c, levels=levels, colors=[GRID_COLOR], linewidths=0.7, linestyles="solid")


def _mark_folds(ax: Any, jac_slice: np.ndarray) -> int:
    """Draw the slice's fold voxels as green dots that shrinking the slice to the panel cannot lose,
    circled when they are few; returns their number."""
    rows, cols = np.nonzero(jac_slice <= 0)
    if rows.size:
        limits = ax.get_xlim(), ax.get_ylim()
        fold = [JACOBIAN_COLORS["fold"]]
        ax.scatter(cols, rows, s=3, c=fold, marker="s", linewidths=0)
        if rows.size <= FOLD_RINGS:
            ax.scatter(cols, rows, s=60, facecolors="none", edgecolors=fold, linewidths=1.0)
        ax.set_xlim(limits[0])  # the markers must not widen the view beyond the image
        ax.set_ylim(limits[1])
    return int(rows.size)


def qa_figure(fixed: np.ndarray, warped: np.ndarray, disp_vox: Optional[np.ndarray],
              jac: Optional[np.ndarray], path: Union[str, Path], title: str = "",
              spacing_xyz: Optional[Sequence[float]] = None, moving_before: Optional[np.ndarray] = None,
              log2_range: Optional[float] = None, dpi: int = DPI) -> Path:
    """Write the QA PNG of a registration and return its path.

    ``fixed``, ``warped`` (the moving image on the fixed grid) and ``moving_before`` (the moving image
    resampled onto the fixed grid by the identity, i.e. before registering; optional, adds the
    *before* column) share the fixed grid, as do ``disp_vox`` (``(*shape, d)``, fixed -> moving, voxels)
    and ``jac`` (det J); either of those two may be ``None`` (the panel says so). 3D: one row per middle
    slice of the axial (z), coronal (y) and sagittal (x) planes; coronal and sagittal with z upwards.
    ``spacing_xyz`` (ITK order) sets the pixel aspect ratios and makes the grid cells equal in
    millimetres. ``log2_range``: the Jacobian scale runs over ``2**-R .. 2**R`` (default: from the
    data, :func:`jacobian_log2_range`). ``title`` (e.g. :func:`qa_title`) heads the figure; the fold
    fraction of the whole volume (:func:`fold_text`) follows it.
    """
    fig = build_qa_figure(fixed, warped, disp_vox, jac, title, spacing_xyz, moving_before, log2_range)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
