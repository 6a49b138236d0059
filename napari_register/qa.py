"""Visual quality checks as numpy images: checkerboard, difference, blend, deformation grid,
Jacobian colouring (linear or log scale). The one-file QA figure (PNG) of the command line is in
:mod:`napari_register.qa_figure` (so napari never imports matplotlib).

Pure numpy; the napari layers display these arrays.
Arrays are in array axis order ((z, y, x) or (y, x)); a displacement field ``disp_vox`` has shape
``(*shape, d)`` with its last axis in array order too, in voxel units, and maps every fixed voxel
``x`` to the moving voxel ``x + disp`` (``moving_from_fixed``, see :mod:`napari_register.coords`).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

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


JacobianScale = Literal["linear", "log"]


def jacobian_colormap(vmin: float = 0.0, vmax: float = 2.0, scale: JacobianScale = "linear") -> dict:
    """The colouring of :func:`jacobian_rgb` as a piecewise-linear colormap for napari.

    Returns ``{"controls": (n,), "colors": (n, 4) RGBA, "contrast_limits": (lo, vmax)}``: pass
    controls/colors to ``napari.utils.Colormap`` and set the layer's contrast limits. ``lo`` lies a
    little below 0 so that the band ``[lo, 0]`` (and anything lower, clipped) shows the fold colour.
    napari interpolates linearly in det, so ``scale="log"`` is followed with 16 controls per half.
    """
    _check_range(vmin, vmax, scale)
    lo = -0.02 * (vmax - min(vmin, 0.0))
    tiny = 1e-6 * (vmax - lo)
    inner = np.concatenate([np.geomspace(vmin, 1.0, 17)[1:], np.geomspace(1.0, vmax, 17)[1:]]) \
        if scale == "log" else np.array([1.0, vmax])
    positive = np.concatenate([[tiny, max(vmin, 2 * tiny)], inner])
    colors = np.concatenate([[JACOBIAN_COLORS["fold"]] * 2, _jacobian_colors(positive, vmin, vmax, scale)])
    controls = (np.concatenate([[lo, 0.0], positive]) - lo) / (vmax - lo)
    rgba = np.concatenate([colors, np.ones((len(colors), 1))], 1)
    return {"controls": controls, "colors": rgba, "contrast_limits": (lo, vmax)}


def _check_range(vmin: float, vmax: float, scale: str = "linear") -> None:
    if scale not in ("linear", "log"):
        raise ValueError(f"Jacobian colour scale must be 'linear' or 'log', got {scale!r}")
    low_ok = vmin > 0 if scale == "log" else vmin >= 0  # log(0) has no place on a log scale
    if not (low_ok and vmin < 1 < vmax):
        raise ValueError(f"Jacobian colouring is centred at 1: need {'0 <' if scale == 'log' else '0 <='} vmin < 1 "
                         f"< vmax on a {scale} scale, got {vmin}, {vmax}")


def jacobian_position(jac: np.ndarray, vmin: float = 0.0, vmax: float = 2.0,
                      scale: JacobianScale = "linear") -> np.ndarray:
    """Place of each determinant on the colour scale: -1 at ``vmin``, 0 at det = 1, +1 at ``vmax``
    (clipped), linear in det or, with ``scale="log"``, in log(det), so that ``vmin = 1 / vmax`` puts
    halving and doubling the volume at the same distance from white. On a log scale det <= 0 has no
    place (-1 or NaN): :func:`jacobian_rgb` paints those with the fold colour."""
    _check_range(vmin, vmax, scale)
    jac = np.asarray(jac)
    if jac.dtype.kind != "f":
        jac = jac.astype(np.float64)  # float32 maps stay float32: half the memory traffic
    if scale == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log(jac)
        lo, hi = -np.log(vmin), np.log(vmax)
    else:
        x, lo, hi = jac - 1.0, 1.0 - vmin, vmax - 1.0
    t = np.where(x < 0, x * (1.0 / lo), x * (1.0 / hi))
    return np.clip(t, -1.0, 1.0, out=t)


def _jacobian_colors(jac: np.ndarray, vmin: float, vmax: float, scale: str) -> np.ndarray:
    """Float RGB in [0, 1] of :func:`jacobian_rgb` (before rounding to bytes)."""
    jac = np.asarray(jac)
    t = jacobian_position(jac, vmin, vmax, scale)
    c = JACOBIAN_COLORS
    # per channel: shrink at t = -1, keep at 0, grow at +1, linear between (np.interp: no (N, 3) temporaries)
    rgb = np.stack([np.interp(t, (-1.0, 0.0, 1.0), (c["shrink"][k], c["keep"][k], c["grow"][k]))
                    for k in range(3)], -1)
    rgb[jac <= 0] = c["fold"]
    rgb[np.isnan(jac)] = NAN_COLOR
    return rgb


def jacobian_rgb(jac: np.ndarray, vmin: float = 0.0, vmax: float = 2.0,
                 scale: JacobianScale = "linear") -> np.ndarray:
    """Colour a Jacobian determinant map -> uint8 RGB ``(*jac.shape, 3)``.

    Blue (``vmin``, shrinking) -> white (1, volume kept) -> red (``vmax``, growing), clipped at both
    ends, linear in det or in log(det) (``scale="log"``, see :func:`jacobian_position`); ``det <= 0``
    (folding) is bright green; NaN is grey. Colours: :data:`JACOBIAN_COLORS`.
    """
    return np.round(_jacobian_colors(jac, vmin, vmax, scale) * 255).astype(np.uint8)

