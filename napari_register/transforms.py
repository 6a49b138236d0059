"""Transforms in physical space, always ``moving_from_fixed`` (ITK's direction).

A transform maps a fixed physical point (x, y[, z], LPS mm) to where it lands in the moving image.
Warping samples the moving image at the mapped points of the fixed grid; warping points maps fixed
landmarks into the moving image (compare them with the moving landmarks for TRE).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .coords import Geometry, apply_h, matrix_map, sample
from .image import Image


class Transform:
    """Base class: subclasses implement :meth:`moving_from_fixed` on ``(N, d)`` physical points."""

    ndim: int

    def moving_from_fixed(self, points: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fixed_from_moving(self, points: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def on_grid(self, geometry: Geometry) -> np.ndarray:
        """Mapped physical points of every voxel of ``geometry``, ``(*shape, d)`` float64."""
        pts = geometry.points_phys().reshape(-1, geometry.ndim)
        return self.moving_from_fixed(pts).reshape(*geometry.shape, geometry.ndim)

    def to_field(self, geometry: Geometry) -> "DisplacementField":
        return DisplacementField(geometry, (self.on_grid(geometry) - geometry.points_phys()).astype(np.float32))

    def as_matrix(self) -> np.ndarray | None:
        """The homogeneous matrix of this transform, or None when it is not one (a field)."""
        return None

    def then(self, other: "Transform") -> "Composite":
        """``self`` applied first to fixed points, then ``other`` (``other o self``)."""
        return Composite([self, other])


@dataclass
class MatrixTransform(Transform):
    """Affine (last row 0..0 1) or 2D homography: homogeneous ``moving_phys_from_fixed_phys``."""

    matrix: np.ndarray

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        self.ndim = self.matrix.shape[0] - 1

    @classmethod
    def translation(cls, t: Sequence[float]) -> "MatrixTransform":
        m = np.eye(len(t) + 1)
        m[:-1, -1] = t
        return cls(m)

    @property
    def is_affine(self) -> bool:
        return np.allclose(self.matrix[-1, :-1], 0) and np.isclose(self.matrix[-1, -1], 1)

    def moving_from_fixed(self, points: np.ndarray) -> np.ndarray:
        return apply_h(self.matrix, points)

    def fixed_from_moving(self, points: np.ndarray) -> np.ndarray:
        return apply_h(np.linalg.inv(self.matrix), points)

    def as_matrix(self) -> np.ndarray:
        return self.matrix

    def inverse(self) -> "MatrixTransform":
        return MatrixTransform(np.linalg.inv(self.matrix))

    @classmethod
    def load_txt(cls, path: str | os.PathLike, dim: int) -> "MatrixTransform":
        """A ``(dim+1) x (dim+1)`` moving_phys_from_fixed_phys matrix from text (as :meth:`save_txt`
        writes it, e.g. a run's ``homography.txt``); a clear error for any other content."""
        from .errors import InputError, MissingFileError

        p = Path(path)
        if not p.is_file():
            raise MissingFileError(f"{p}: no such matrix file; give a run's homography.txt or a text file of "
                                   f"a {dim + 1}x{dim + 1} matrix")
        try:
            m = np.loadtxt(p, comments="#", ndmin=2)
        except ValueError as e:
            raise InputError(f"{p}: not a matrix of numbers ({e}); write {dim + 1} rows of {dim + 1} numbers") from None
        if m.shape != (dim + 1, dim + 1) or not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
            raise InputError(f"{p}: expected an invertible {dim + 1}x{dim + 1} matrix for {dim}D images, got "
                             f"shape {m.shape}; write moving_phys_from_fixed_phys, homogeneous")
        return cls(m)

    def save_txt(self, path: str | os.PathLike) -> Path:
        """3x3 (or 4x4) matrix as text, moving_phys_from_fixed_phys."""
        np.savetxt(path, self.matrix, header="moving_phys_from_fixed_phys (homogeneous, ITK LPS physical units)")
        return Path(path)


@dataclass
class Composite(Transform):
    """``transforms[0]`` is applied first to the fixed points, the last one lands in the moving image."""

    transforms: list

    def __post_init__(self) -> None:
        self.ndim = self.transforms[0].ndim

    def moving_from_fixed(self, points: np.ndarray) -> np.ndarray:
        for t in self.transforms:
            points = t.moving_from_fixed(points)
        return points

    def as_matrix(self) -> np.ndarray | None:
        out = np.eye(self.ndim + 1)
        for t in self.transforms:
            m = t.as_matrix()
            if m is None:
                return None
            out = m @ out
        return out

    def fixed_from_moving(self, points: np.ndarray) -> np.ndarray:
        for t in reversed(self.transforms):
            points = t.fixed_from_moving(points)
        return points


@dataclass
class DisplacementField(Transform):
    """Dense field on the fixed grid: ``disp[..., :]`` = moving_phys - fixed_phys (x, y[, z] order),
    exactly what ITK's ``DisplacementFieldTransform`` stores; linear interpolation between voxels."""

    geometry: Geometry
    disp: np.ndarray

    def __post_init__(self) -> None:
        self.ndim = self.geometry.ndim
        expected = (*self.geometry.shape, self.ndim)
        if self.disp.shape != expected:
            raise ValueError(f"displacement of shape {self.disp.shape}, expected {expected} for the fixed grid")

    def _sample_disp(self, points: np.ndarray) -> np.ndarray:
        """Displacement at physical points ``(N, d)`` (border value outside the grid)."""
        g = self.geometry
        norm = apply_h(g.norm_from_phys(), points)
        field = torch.from_numpy(np.moveaxis(self.disp, -1, 0)[None].astype(np.float32))
        coords = torch.from_numpy(norm.T.astype(np.float32)).reshape(1, g.ndim, -1, *([1] * (g.ndim - 1)))
        out = sample(field, coords)  # (1, d, N, 1[, 1])
        return out.reshape(g.ndim, -1).T.double().numpy()

    def moving_from_fixed(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        return points + self._sample_disp(points)

    def fixed_from_moving(self, points: np.ndarray, iterations: int = 50, tol: float = 1e-4) -> np.ndarray:
        """Invert by fixed-point iteration ``p <- q - u(p)`` (converges where |grad u| < 1)."""
        q = np.asarray(points, dtype=np.float64)
        p = q.copy()
        for _ in range(iterations):
            p_new = q - self._sample_disp(p)
            if np.abs(p_new - p).max(initial=0) < tol:
                return p_new
            p = p_new
        return p

    def on_grid(self, geometry: Geometry) -> np.ndarray:
        if geometry == self.geometry:
            return geometry.points_phys() + self.disp
        return super().on_grid(geometry)

    def invert(self, geometry: Geometry | None = None) -> "DisplacementField":
        """``fixed_from_moving`` as a field on ``geometry`` (default: the same grid)."""
        geometry = geometry or self.geometry
        pts = geometry.points_phys().reshape(-1, geometry.ndim)
        inv = self.fixed_from_moving(pts) - pts
        return DisplacementField(geometry, inv.reshape(*geometry.shape, geometry.ndim).astype(np.float32))

    def disp_vox(self) -> np.ndarray:
        """Displacement in fixed voxel units, array-order components ``(*shape, d)`` (for display)."""
        lin = self.geometry.vox_from_phys()[:-1, :-1]
        return (self.disp.reshape(-1, self.ndim) @ lin.T).reshape(self.disp.shape).astype(np.float32)

    def magnitude(self) -> np.ndarray:
        return np.linalg.norm(self.disp, axis=-1)

    def jacobian(self) -> np.ndarray:
        """Determinant of the Jacobian of x -> x + u(x) in physical units (1 = volume kept)."""
        return jacobian_determinant(self.disp, self.geometry)

    def to_sitk(self):
        """SimpleITK ``DisplacementFieldTransform`` that reproduces this warp with ``sitk.Resample``."""
        import SimpleITK as sitk

        return sitk.DisplacementFieldTransform(self._vector_image(np.float64))  # takes ownership of it

    def _vector_image(self, dtype: type):
        from .image import to_sitk

        return to_sitk(Image(self.disp.astype(dtype), self.geometry, channels=True))

    def save(self, path: str | os.PathLike) -> Path:
        """``.h5``/``.tfm``: ITK transform file; ``.nii.gz``/``.nii``/``.mha``/``.nrrd``: vector image
        (vectors in mm, physical x, y, z, on the fixed grid) that ITK, ANTs and 3D Slicer apply."""
        import SimpleITK as sitk

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        name = p.name.lower()
        if name.endswith((".h5", ".hdf5", ".tfm")):
            sitk.WriteTransform(self.to_sitk(), str(p))
        else:  # float32 on disk halves the file; readers cast to double for the transform
            sitk.WriteImage(self._vector_image(np.float32), str(p), useCompression=True)
        return p


def jacobian_determinant(disp: np.ndarray, geometry: Geometry) -> np.ndarray:
    """det(I + du/dx) of a physical displacement ``(*shape, d)`` on ``geometry`` (central differences,
    one-sided at the edges; in torch with an explicit determinant: a brain takes 0.3 s, not 1.9 s)."""
    d = geometry.ndim
    u = torch.from_numpy(np.ascontiguousarray(disp, dtype=np.float32))
    dims = tuple(range(d))
    # du_i/dvox_j, vox in array order; chain rule through vox_from_phys to get du/dphys.
    grads = [torch.gradient(u[..., i], dim=dims) for i in range(d)]
    vfp = torch.from_numpy(geometry.vox_from_phys()[:-1, :-1].astype(np.float32))
    jac = [[sum(grads[i][k] * vfp[k, j] for k in range(d)) + (1.0 if i == j else 0.0) for j in range(d)]
           for i in range(d)]
    if d == 2:
        det = jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    else:
        det = (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
               - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
               + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))
    return det.numpy()


def _moving_norm_coords(transform: Transform, moving: Geometry, fixed: Geometry) -> torch.Tensor:
    """Where every fixed voxel lands in ``moving``'s norm frame, ``(1, d, *fixed.shape)`` float32.

    Matrices and a field on the fixed grid are evaluated in torch on the grid, without the float64
    point arrays; anything else goes through the transform's physical points."""
    d = fixed.ndim
    m = transform.as_matrix()
    if m is not None:
        norm_m = torch.from_numpy(moving.norm_from_phys() @ m @ fixed.phys_from_norm())
        return matrix_map(norm_m, fixed.shape).float()
    if isinstance(transform, DisplacementField) and transform.geometry == fixed:
        to_norm = moving.norm_from_phys()
        base = matrix_map(torch.from_numpy(to_norm @ fixed.phys_from_norm()), fixed.shape).float()
        disp = torch.from_numpy(np.ascontiguousarray(transform.disp, dtype=np.float32))
        lin = torch.from_numpy(to_norm[:d, :d].astype(np.float32))
        return base + torch.movedim(disp @ lin.T, -1, 0)[None]
    norm = apply_h(moving.norm_from_phys(), transform.on_grid(fixed).reshape(-1, d))
    return torch.from_numpy(norm.T.astype(np.float32)).reshape(1, d, *fixed.shape)


def warp_image(moving: Image, transform: Transform, fixed: Geometry, *, labels: bool = False,
               fill: float = 0.0) -> Image:
    """Resample ``moving`` onto the ``fixed`` grid through ``transform`` (moving_from_fixed).

    Linear interpolation for images; nearest for label maps (``labels=True``), which keeps the label
    set. Outside the moving image the value is ``fill``."""
    if moving.ndim != fixed.ndim:
        raise ValueError(f"cannot warp a {moving.ndim}D image with a {fixed.ndim}D transform")
    coords = _moving_norm_coords(transform, moving.geometry, fixed)
    arr = moving.array
    chan = arr if moving.channels else arr[..., None]
    data = torch.from_numpy(np.ascontiguousarray(np.moveaxis(chan, -1, 0)[None]).astype(np.float32))
    # As ITK: a point within half a voxel of the edge takes the border values, beyond it ``fill``.
    out = sample(data, coords, mode="nearest" if labels else "bilinear", padding_mode="border")
    half = torch.tensor([0.5 / max(n - 1, 1) for n in moving.geometry.shape]).view(1, -1, *([1] * fixed.ndim))
    inside = ((coords >= -half) & (coords <= 1 + half)).all(1, keepdim=True)
    out = torch.where(inside, out, torch.full_like(out, fill))
    res = np.moveaxis(out[0].numpy(), 0, -1)
    if not moving.channels:
        res = res[..., 0]
    if labels or moving.array.dtype.kind in "iub":
        res = np.rint(res) if moving.array.dtype.kind in "iub" else res
        res = res.astype(moving.array.dtype)
    return Image(res, fixed, channels=moving.channels, rgb=moving.rgb)
