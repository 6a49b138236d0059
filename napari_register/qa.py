"""Visual quality checks as numpy images: checkerboard, difference, blend, deformation grid,
Jacobian colouring, and a one-file QA figure (PNG) for the command line.

Pure numpy (matplotlib only inside :func:`qa_figure`); the napari layers display these arrays.
Arrays are in array axis order ((z, y, x) or (y, x)); a displacement field ``disp_vox`` has shape
``(*shape, d)`` with its last axis in array order too, in voxel units, and maps every fixed voxel
``x`` to the moving voxel ``x + disp`` (``moving_from_fixed``, see :mod:`napari_register.coords`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .intensity import normalise

# Jacobian determinant colours (RGB floats in [0, 1]): a diverging map centred at 1 plus a colour
# for folds that appears in neither half, so folding is never read as strong shrinking.
JACOBIAN_COLORS = {
    "shrink": (0.13, 0.40, 0.67),  # det at vmin (RdBu's blue)
    "keep": (1.0, 1.0, 1.0),       # det = 1
    "grow": (0.70, 0.09, 0.17),    # det at vmax (RdBu's red)
    "fold": (0.0, 1.0, 0.0),       # det <= 0
}
NAN_COLOR = (0.5, 0.5, 0.5)


def normalize(image: np.ndarray) -> np.ndarray:
    """Display scaling of QA views: :func:`intensity.normalise` at the 1st/99th percentiles."""
    return normalise(image, (1.0, 99.0))


def _pair(name: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name}: images must share one grid, got shapes {a.shape} and {b.shape}; "
                         "compare the fixed image with the *warped* moving image")
    return normalize(a), normalize(b)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: Union[int, Sequence[int]] = 8,
                 rgb: bool = False) -> np.ndarray:
    """Alternate tiles of ``a`` and ``b`` (2D or 3D, same shape), each normalised by percentiles.

    ``tiles`` is the number of tiles along every axis (or one number per axis); the tile at
    index 0 in every axis comes from ``a``. ``rgb=True`` treats the last axis as colour channels.
    Returns float32 in [0, 1].
    """
    na, nb = _pair("checkerboard", a, b)
    spatial = na.shape[:-1] if rgb else na.shape
    tiles = [int(tiles)] * len(spatial) if np.isscalar(tiles) else [int(t) for t in tiles]
    if len(tiles) != len(spatial) or min(tiles) < 1:
        raise ValueError(f"checkerboard: tiles must be a positive number or one per axis of {spatial}, got {tiles}")
    # tile index of every voxel along each axis, summed: even -> a, odd -> b
    parity = sum(np.arange(s)[(slice(None),) + (None,) * (len(spatial) - 1 - i)] * t // s
                 for i, (s, t) in enumerate(zip(spatial, tiles))) % 2
    if rgb:
        parity = parity[..., None]
    return np.where(parity == 0, na, nb).astype(np.float32)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed difference ``a - b`` of the percentile-normalised images, float32 in [-1, 1]."""
    na, nb = _pair("difference", a, b)
    return na - nb


def blend(a: np.ndarray, b: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * a + alpha * b`` of the percentile-normalised images, float32 in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"blend: alpha must lie in [0, 1], got {alpha}")
    na, nb = _pair("blend", a, b)
    return ((1 - alpha) * na + alpha * nb).astype(np.float32)


def _grid_lines(coords: np.ndarray, spacing: np.ndarray, thickness: float,
                axes: Sequence[int]) -> np.ndarray:
    """Voxels of ``coords`` ``(*S, d)`` (moving voxel positions) lying on the moving grid lines.

    A voxel is on a line of coordinate axis ``k`` when ``coords[..., k]`` is within
    ``thickness / 2`` of a multiple of ``spacing[k]``. Where the field stretches, neighbouring voxels
    can step over a multiple without either being that close; then the one nearer to the line is
    marked too, so lines stay unbroken.
    """
    out = np.zeros(coords.shape[:-1], dtype=bool)
    for k in axes:
        c = coords[..., k] / spacing[k]
        dist = np.abs(c - np.round(c)) * spacing[k]
        out |= dist <= thickness / 2
        cell = np.floor(c)
        for j in range(out.ndim):  # neighbours along every array axis of the output
            lo = [slice(None)] * out.ndim
            hi = [slice(None)] * out.ndim
            lo[j], hi[j] = slice(None, -1), slice(1, None)
            lo, hi = tuple(lo), tuple(hi)
            crossed = cell[lo] != cell[hi]
            first_nearer = dist[lo] <= dist[hi]
            out[lo] |= crossed & first_nearer
            out[hi] |= crossed & ~first_nearer
    return out


def _voxel_coords(disp_vox: np.ndarray) -> np.ndarray:
    disp = np.asarray(disp_vox, dtype=np.float64)
    d = disp.shape[-1]
    if disp.ndim != d + 1:
        raise ValueError(f"displacement field must have shape (*shape, d) with d = number of spatial "
                         f"axes, got {disp.shape}")
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in disp.shape[:-1]], indexing="ij"), -1)
    return ident + disp


def _per_axis(spacing: Union[float, Sequence[float]], d: int) -> np.ndarray:
    s = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (d,))
    if np.any(s <= 0):
        raise ValueError(f"grid spacing must be positive, got {spacing}")
    return s


def grid_image(disp_vox: np.ndarray, spacing: Union[float, Sequence[float]] = 8, thickness: float = 1.0,
               axes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Render the moving image's regular grid warped into the fixed frame -> float32 0/1 ``shape``.

    ``disp_vox``: ``(*shape, d)`` voxel displacement (array-order channels), fixed -> moving.
    ``spacing``: grid period in moving voxels (one number or one per axis). A voxel is on a line if
    its moving position along any axis in ``axes`` (default: all) is within ``thickness / 2`` of a
    multiple of the spacing. In 3D these are the grid's planes, so every 2D slice of the result shows
    the lines of its two in-plane axes; a slice lying on a plane of its own normal axis is filled.
    Use :func:`grid_slice` (or ``axes``) to draw only in-plane lines.
    """
    coords = _voxel_coords(disp_vox)
    d = coords.shape[-1]
    axes = range(d) if axes is None else axes
    return _grid_lines(coords, _per_axis(spacing, d), thickness, axes).astype(np.float32)


def slice_coords(disp_vox: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Moving voxel positions ``x + disp`` of the fixed voxels of one slice -> ``(*slice_shape, d)``."""
    disp = np.asarray(disp_vox, dtype=np.float64)
    d = disp.shape[-1]
    if disp.ndim != d + 1 or not 0 <= axis < d:
        raise ValueError(f"need a (*shape, d) field and 0 <= axis < d, got shape {disp.shape}, axis {axis}")
    # only the slice's voxels (not the whole volume), positions still d-dimensional
    ranges = [np.arange(s) for s in disp.shape[:-1]]
    ranges[axis] = np.array([index])
    ident = np.stack(np.meshgrid(*ranges, indexing="ij"), -1)
    return np.take(ident + np.take(disp, [index], axis=axis), 0, axis=axis)


def grid_slice(disp_vox: np.ndarray, axis: int, index: int, spacing: Union[float, Sequence[float]] = 8,
               thickness: float = 1.0) -> np.ndarray:
    """2D deformation grid of the slice ``index`` along array ``axis`` of a 3D field: only the lines of
    the two in-plane axes, so a slice never fills up -> float32 0/1 of the slice's shape."""
    coords = slice_coords(disp_vox, axis, index)
    d = coords.shape[-1]
    in_plane = [k for k in range(d) if k != axis]
    return _grid_lines(coords, _per_axis(spacing, d), thickness, in_plane).astype(np.float32)


def jacobian_colormap(vmin: float = 0.0, vmax: float = 2.0) -> dict:
    """The colouring of :func:`jacobian_rgb` as a piecewise-linear colormap for napari.

    Returns ``{"controls": (n,), "colors": (n, 4) RGBA, "contrast_limits": (lo, vmax)}``: pass
    controls/colors to ``napari.utils.Colormap`` and set the layer's contrast limits. ``lo`` lies a
    little below 0 so that the band ``[lo, 0]`` (and anything lower, clipped) shows the fold colour.
    """
    _check_range(vmin, vmax)
    lo = -0.02 * (vmax - min(vmin, 0.0))
    tiny = 1e-6 * (vmax - lo)
    c = JACOBIAN_COLORS
    values = [lo, 0.0, tiny, max(vmin, 2 * tiny), 1.0, vmax]
    colors = [c["fold"], c["fold"], c["shrink"], c["shrink"], c["keep"], c["grow"]]
    controls = (np.asarray(values) - lo) / (vmax - lo)
    rgba = np.concatenate([np.asarray(colors), np.ones((len(colors), 1))], 1)
    return {"controls": controls, "colors": rgba, "contrast_limits": (lo, vmax)}


def _check_range(vmin: float, vmax: float) -> None:
    if not (0 <= vmin < 1 < vmax):
        raise ValueError(f"Jacobian colouring is centred at 1: need 0 <= vmin < 1 < vmax, got {vmin}, {vmax}")


def jacobian_rgb(jac: np.ndarray, vmin: float = 0.0, vmax: float = 2.0) -> np.ndarray:
    """Colour a Jacobian determinant map -> uint8 RGB ``(*jac.shape, 3)``.

    Blue (``vmin``, shrinking) -> white (1, volume kept) -> red (``vmax``, growing), clipped at both
    ends; ``det <= 0`` (folding) is bright green; NaN is grey. Colours: :data:`JACOBIAN_COLORS`.
    """
    _check_range(vmin, vmax)
    jac = np.asarray(jac, dtype=np.float64)
    c = {k: np.asarray(v) for k, v in JACOBIAN_COLORS.items()}
    below = np.clip((jac - vmin) / (1.0 - vmin), 0, 1)[..., None]  # 0 at vmin, 1 at det = 1
    above = np.clip((jac - 1.0) / (vmax - 1.0), 0, 1)[..., None]   # 0 at det = 1, 1 at vmax
    rgb = np.where(jac[..., None] < 1, c["shrink"] + below * (c["keep"] - c["shrink"]),
                   c["keep"] + above * (c["grow"] - c["keep"]))
    rgb[jac <= 0] = c["fold"]
    rgb[np.isnan(jac)] = NAN_COLOR
    return np.round(rgb * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------- figure

_PLANES = ((0, "axial"), (1, "coronal"), (2, "sagittal"))  # array axis held fixed in each plane


def _auto_grid_spacing(shape: Sequence[int], spacing_zyx: np.ndarray) -> np.ndarray:
    """About 12 grid cells across the largest physical extent, equal in millimetres on every axis."""
    step_mm = max(np.asarray(shape) * spacing_zyx) / 12
    return np.maximum(step_mm / spacing_zyx, 2.0)


def qa_figure(fixed: np.ndarray, warped: np.ndarray, disp_vox: Optional[np.ndarray],
              jac: Optional[np.ndarray], path: Union[str, Path], title: str = "",
              spacing_xyz: Optional[Sequence[float]] = None, vmin: float = 0.0, vmax: float = 2.0) -> Path:
    """Write a QA PNG: checkerboard of fixed/warped, fixed with the warped grid, Jacobian colours.

    2D: one row of three panels. 3D: one row per middle slice of the axial (z), coronal (y) and
    sagittal (x) planes; coronal and sagittal are drawn with z upwards. ``spacing_xyz`` (ITK order)
    sets the pixel aspect ratios and makes the grid cells equal in millimetres. ``disp_vox`` or
    ``jac`` may be ``None`` (the panel says so). Returns the path written.
    """
    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch inside a napari session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    fixed, warped = np.asarray(fixed), np.asarray(warped)
    d = fixed.ndim
    if d not in (2, 3):
        raise ValueError(f"qa_figure draws 2D or 3D images, got shape {fixed.shape}")
    for name, arr, shape in (("disp_vox", disp_vox, fixed.shape + (d,)), ("jac", jac, fixed.shape)):
        if arr is not None and np.shape(arr) != shape:
            raise ValueError(f"qa_figure: {name} has shape {np.shape(arr)}, expected {shape} (fixed grid)")
    spacing_zyx = np.ones(d) if spacing_xyz is None else np.asarray(spacing_xyz, dtype=np.float64)[::-1]
    if spacing_zyx.size != d:
        raise ValueError(f"qa_figure: spacing_xyz {tuple(spacing_xyz)} does not match a {d}D image")
    grid_step = _auto_grid_spacing(fixed.shape, spacing_zyx)
    board = checkerboard(fixed, warped)
    fixed_n = normalize(fixed)
    # jacobian_rgb's colours; below vmin (0 by default) the colorbar's extension shows the fold colour
    jac_cmap = ListedColormap(jacobian_rgb(np.linspace(vmin + 1e-6, vmax, 256), vmin, vmax) / 255.0
                              ).with_extremes(under=JACOBIAN_COLORS["fold"])

    planes = [(None, "")] if d == 2 else _PLANES
    fig = Figure(figsize=(12, 4 * len(planes)), layout="constrained")  # room for suptitle and colorbars
    FigureCanvasAgg(fig)
    axs = fig.subplots(len(planes), 3, squeeze=False)
    fold_pct = None if jac is None else float(np.mean(np.asarray(jac) <= 0)) * 100
    for row, (axis, plane) in enumerate(planes):
        if axis is None:
            take, shown, aspect, origin = (lambda a: a), (0, 1), spacing_zyx[0] / spacing_zyx[1], "upper"
        else:
            index = fixed.shape[axis] // 2
            take = (lambda a, axis=axis, index=index: np.take(a, index, axis=axis))
            shown = tuple(k for k in range(3) if k != axis)  # (rows, cols) array axes of the slice
            aspect = spacing_zyx[shown[0]] / spacing_zyx[shown[1]]
            origin = "upper" if axis == 0 else "lower"  # z up in coronal and sagittal views
            plane = f"{plane} {index} "
        show = dict(aspect=aspect, origin=origin, interpolation="nearest")

        axs[row, 0].imshow(take(board), cmap="gray", vmin=0, vmax=1, **show)
        axs[row, 0].set_title(f"{plane}checkerboard fixed / warped")

        axs[row, 1].imshow(take(fixed_n), cmap="gray", vmin=0, vmax=1, **show)
        if disp_vox is not None:
            # Contours of the moving coordinates draw the warped grid smoothly at any resolution,
            # unlike the voxel mask of grid_image, which is meant for napari layers.
            coords = _voxel_coords(disp_vox) if axis is None else slice_coords(disp_vox, axis, index)
            for k in shown:
                c = coords[..., k] / grid_step[k]
                levels = np.arange(np.ceil(c.min()), np.floor(c.max()) + 1)
                if levels.size and min(c.shape) >= 2:
                    axs[row, 1].contour(c, levels=levels, colors=[(1.0, 0.8, 0.0)], linewidths=0.8,
                                        linestyles="solid")
            axs[row, 1].set_title(f"{plane}fixed + warped grid")
        else:
            axs[row, 1].set_title(f"{plane}fixed (no displacement field)")

        if jac is not None:
            axs[row, 2].imshow(jacobian_rgb(take(np.asarray(jac)), vmin, vmax), **show)
            axs[row, 2].set_title(f"{plane}Jacobian det. (folds {fold_pct:.2f}%)")
            mappable = ScalarMappable(cmap=jac_cmap, norm=Normalize(vmin, vmax))
            bar = fig.colorbar(mappable, ax=axs[row, 2], fraction=0.046, pad=0.04, extend="min")
            bar.set_label("green: det <= 0 (fold)", fontsize=8)
        else:
            axs[row, 2].set_title(f"{plane}no Jacobian")
        for ax in axs[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
