"""The one coordinate convention of napari-register, and every conversion out of it.

Frames (names of matrices say ``target_from_source``):

* ``vox``  - continuous voxel index in *array axis order* ((z, y, x) for 3D, (y, x) for 2D), the
  order ``SimpleITK.GetArrayFromImage`` returns and napari displays.
* ``norm`` - the core's working frame: ``vox / (shape - 1)``, still in array axis order, so the
  centres of the corner voxels are 0 and 1 (ICON's convention, ``align_corners=True``).
  A *map* is a tensor ``(B, d, *spatial)`` whose channel ``i`` is the ``norm`` coordinate along
  spatial axis ``i`` of the image it points into.
* ``grid`` - what :func:`torch.nn.functional.grid_sample` wants: ``2 * norm - 1`` with the last
  dimension in (x, y[, z]) order, i.e. reversed. Only :func:`grid_from_norm` produces it.
* ``phys`` - ITK physical space (LPS, millimetres), coordinates in (x, y[, z]) order:
  ``phys = origin + direction @ diag(spacing) @ index_xyz`` with ``index_xyz = vox[::-1]``.

A registration result maps fixed to moving (``moving_from_fixed``): the warped image is the moving
image sampled at the mapped fixed points, as in ITK, ANTs and elastix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in physical space.

    ``shape`` is in array order; ``spacing``/``origin`` in (x, y[, z]); ``direction`` is a ``d x d``
    matrix whose columns are the physical directions of the index axes (ITK convention).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray = field(compare=False)

    def __post_init__(self) -> None:
        d = len(self.shape)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(d, d))
        if len(self.spacing) != d or len(self.origin) != d:
            raise ValueError(f"Geometry of a {d}D shape {self.shape} needs {d} spacing and origin values, "
                             f"got spacing={self.spacing}, origin={self.origin}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def default(cls, shape: tuple[int, ...]) -> "Geometry":
        d = len(shape)
        return cls(tuple(shape), (1.0,) * d, (0.0,) * d, np.eye(d))

    def phys_from_vox(self) -> np.ndarray:
        """Homogeneous ``(d+1, d+1)`` matrix: array-order voxel index -> physical (x, y[, z])."""
        d = self.ndim
        rev = np.eye(d)[::-1]  # array order -> xyz order
        m = np.eye(d + 1)
        m[:d, :d] = self.direction @ np.diag(self.spacing) @ rev
        m[:d, d] = self.origin
        return m

    def vox_from_phys(self) -> np.ndarray:
        return np.linalg.inv(self.phys_from_vox())

    def norm_from_vox(self) -> np.ndarray:
        return norm_from_vox(self.shape)

    def phys_from_norm(self) -> np.ndarray:
        return self.phys_from_vox() @ np.linalg.inv(self.norm_from_vox())

    def norm_from_phys(self) -> np.ndarray:
        return self.norm_from_vox() @ self.vox_from_phys()

    def center_phys(self) -> np.ndarray:
        """Physical position of the centre of the grid (mean of the corner voxel centres)."""
        c = (np.asarray(self.shape, dtype=np.float64) - 1) / 2
        return apply_h(self.phys_from_vox(), c[None])[0]

    def with_shape(self, shape: tuple[int, ...]) -> "Geometry":
        """Same physical extent (corner voxel centres kept) sampled with ``shape`` voxels."""
        shape = tuple(int(s) for s in shape)
        factor = np.array([(a - 1) / max(b - 1, 1) for a, b in zip(self.shape, shape)])
        spacing = np.asarray(self.spacing) * factor[::-1]
        spacing = np.where(spacing > 0, spacing, np.asarray(self.spacing))
        return Geometry(shape, tuple(spacing), self.origin, self.direction)

    def points_phys(self) -> np.ndarray:
        """Physical positions of every voxel centre, shape ``(*shape, d)``."""
        vox = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in self.shape], indexing="ij"), -1)
        return apply_h(self.phys_from_vox(), vox.reshape(-1, self.ndim)).reshape(*self.shape, self.ndim)


def norm_from_vox(shape: tuple[int, ...]) -> np.ndarray:
    d = len(shape)
    m = np.eye(d + 1)
    for i, s in enumerate(shape):
        m[i, i] = 1.0 / max(int(s) - 1, 1)
    return m


def apply_h(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a homogeneous matrix to points ``(N, d)`` (with the perspective divide)."""
    points = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    d = m.shape[0] - 1
    out = points @ m[:d, :d].T + m[:d, d]
    if np.allclose(m[d, :d], 0) and m[d, d] == 1:  # affine: no divide (the common, large case)
        return out
    return out / (points @ m[d, :d] + m[d, d])[:, None]


def identity_map(shape: tuple[int, ...], device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Identity map ``(1, d, *shape)`` in the ``norm`` frame."""
    axes = [torch.linspace(0, 1, s, device=device, dtype=dtype) if s > 1
            else torch.zeros(1, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)[None]


def grid_from_norm(coords: torch.Tensor) -> torch.Tensor:
    """``(B, d, *S)`` norm coordinates -> ``(B, *S, d)`` grid_sample grid (x first, [-1, 1])."""
    d = coords.shape[1]
    perm = (0, *range(2, 2 + d), 1)
    return (2 * coords - 1).permute(perm).flip(-1)


def sample(image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "border") -> torch.Tensor:
    """Sample ``image (B, C, *S_in)`` at norm coordinates ``coords (B, d, *S_out)`` of its grid.

    Returns ``(B, C, *S_out)``. ``mode`` is ``"bilinear"`` (linear in 3D too) or ``"nearest"``.
    """
    d = coords.shape[1]
    if image.dim() != d + 2:
        raise ValueError(f"sample: image of shape {tuple(image.shape)} does not match {d}D coordinates "
                         f"of shape {tuple(coords.shape)}; expected (B, C, *spatial) with {d} spatial dims")
    return F.grid_sample(image, grid_from_norm(coords).to(image.dtype), mode=mode,
                         padding_mode=padding_mode, align_corners=True)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``(outer o inner)(x) = outer(inner(x))`` for maps in the norm frame.

    ``outer`` is resampled at the points ``inner`` gives; its displacement is extrapolated by the
    border value, so a map of identity outside its grid stays a translation there.
    """
    ident_outer = identity_map(tuple(outer.shape[2:]), outer.device, outer.dtype)
    disp = sample(outer - ident_outer, inner)
    return inner + disp


def symmetrise(phi_ab: torch.Tensor, phi_ba: torch.Tensor) -> torch.Tensor:
    """The mean of ``phi_ab`` and ``phi_ba``'s inverse, to first order: ``phi_ab - (phi_ba o phi_ab - id) / 2``.

    ``phi_ab`` maps fixed to moving, ``phi_ba`` (on the moving grid) maps back. A bias both directions
    share (a net that moves an image registered to itself) cancels: ``phi_ab = phi_ba = id + b`` gives
    ``id + O(b grad b)``. Translations of either image commute with it, so it keeps equivariance.
    """
    ident = identity_map(tuple(phi_ab.shape[2:]), phi_ab.device, phi_ab.dtype)
    return phi_ab - 0.5 * (compose(phi_ba, phi_ab) - ident)


def resize_map(phi: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resample a map to another grid of the same extent (corner voxels kept)."""
    if tuple(phi.shape[2:]) == tuple(shape):
        return phi
    d = phi.shape[1]
    ident_in = identity_map(tuple(phi.shape[2:]), phi.device, phi.dtype)
    mode = "bilinear" if d == 2 else "trilinear"
    disp = F.interpolate(phi - ident_in, size=tuple(shape), mode=mode, align_corners=True)
    return identity_map(tuple(shape), phi.device, phi.dtype) + disp


def resize_image(image: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resample ``(B, C, *S)`` to ``shape`` keeping the corner voxel centres (align_corners).

    Downsampling halves the grid by 2x average pooling while it is at least twice the target (an
    anti-aliasing box filter, centred, so no half-voxel shift), then interpolates linearly at the
    target voxel centres. Pooling is ~100x cheaper than a smoothing convolution at full resolution.
    """
    d = image.dim() - 2
    shape = tuple(int(s) for s in shape)
    if tuple(image.shape[2:]) == shape:
        return image
    offset, step = [0.0] * d, [1.0] * d  # pooled voxel j sits at offset + step * j input voxels
    out = image
    while True:
        kernel = [2 if s >= 2 * m else 1 for s, m in zip(out.shape[2:], shape)]
        if max(kernel) == 1:
            break
        out = (F.avg_pool3d if d == 3 else F.avg_pool2d)(out, tuple(kernel))
        offset = [o + st * (k - 1) / 2 for o, st, k in zip(offset, step, kernel)]
        step = [st * k for st, k in zip(step, kernel)]
    if out.shape[2:] == image.shape[2:]:
        mode = "bilinear" if d == 2 else "trilinear"
        return F.interpolate(image, size=shape, mode=mode, align_corners=True)
    # target voxel centres in input voxel units (the align_corners frame of both grids), then in pooled voxels
    targets = [torch.linspace(0, n - 1, m, device=image.device, dtype=image.dtype) if m > 1
               else torch.zeros(1, device=image.device, dtype=image.dtype) for n, m in zip(image.shape[2:], shape)]
    pos = [(t - o) / st for t, o, st in zip(targets, offset, step)]
    norm = torch.stack(torch.meshgrid(*[p / max(s - 1, 1) for p, s in zip(pos, out.shape[2:])],
                                      indexing="ij"), 0)[None].expand(image.shape[0], -1, *shape)
    return sample(out, norm)


def apply_matrix(matrix: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """``matrix o phi``: a homogeneous ``(d+1, d+1)`` matrix on norm coordinates (or ``(B, d+1, d+1)``,
    one per map of the batch) applied to the points of a map ``(B, d, *S)`` (affine, or a 2D
    homography with the perspective divide). Exact and far cheaper than resampling a matrix's map
    with :func:`compose`."""
    d = matrix.shape[-1] - 1
    pts = phi.flatten(2)  # (B, d, N)
    out = matrix[..., :d, :d] @ pts + matrix[..., :d, d:]
    if d and bool((matrix[..., d, :d] != 0).any() or (matrix[..., d, d] != 1).any()):
        out = out / (matrix[..., d:, :d] @ pts + matrix[..., d:, d:])
    return out.reshape(out.shape[0], d, *phi.shape[2:])


def matrix_map(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Map ``(1, d, *shape)`` of a homogeneous ``(d+1, d+1)`` matrix acting on norm coordinates
    (``(B, d, *shape)`` for a batch of matrices ``(B, d+1, d+1)``)."""
    return apply_matrix(matrix, identity_map(tuple(shape), matrix.device, matrix.dtype))


def fit_homography(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None,
                   exact: bool = False) -> torch.Tensor:
    """``(..., 3, 3)`` homographies (h33 = 1) with ``dst ~ H src`` for 2D point sets ``(..., N, 2)``:
    the DLT equations, solved exactly for N = 4 and by least squares for more (each point's two
    equations scaled by ``sqrt(weights (..., N))`` when given: 0 drops a point); float64 inside,
    differentiable, returned in ``dst``'s dtype. ``exact``: four points whose system may be singular
    (random samples) give non-finite entries instead of an error."""
    if src.shape != dst.shape or src.shape[-1] != 2 or src.shape[-2] < 4:
        raise ValueError(f"fit_homography: expected two (..., N >= 4, 2) point sets, got {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    s, t = src.double(), dst.double()
    x, y, u, v = s[..., 0], s[..., 1], t[..., 0], t[..., 1]
    o, z = torch.ones_like(x), torch.zeros_like(x)
    a = torch.cat([torch.stack([x, y, o, z, z, z, -u * x, -u * y], -1),
                   torch.stack([z, z, z, x, y, o, -v * x, -v * y], -1)], -2)  # (..., 2N, 8)
    rhs = torch.cat([u, v], -1)
    if weights is not None:
        r = weights.double().sqrt().repeat(*[1] * (weights.dim() - 1), 2)
        a, rhs = a * r[..., None], rhs * r
        return torch.cat([torch.linalg.lstsq(a, rhs[..., None]).solution[..., 0], o[..., :1]], -1).view(
            *a.shape[:-2], 3, 3).to(dst.dtype)
    if exact and src.shape[-2] == 4:
        h, info = torch.linalg.solve_ex(a, rhs)
        h = torch.where((info == 0)[..., None], h, torch.full_like(h, float("nan")))
        return torch.cat([h, o[..., :1]], -1).view(*h.shape[:-1], 3, 3).to(dst.dtype)
    h = torch.linalg.solve(a, rhs) if src.shape[-2] == 4 else torch.linalg.lstsq(a, rhs[..., None]).solution[..., 0]
    return torch.cat([h, o[..., :1]], -1).view(*h.shape[:-1], 3, 3).to(dst.dtype)


def map_points(hom: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """2D points ``(..., N, 2)`` (x, y) through homographies ``(..., 3, 3)`` (leading dimensions
    broadcast), with the perspective divide, in ``hom``'s dtype."""
    p = torch.cat([pts, torch.ones_like(pts[..., :1])], -1).to(hom.dtype) @ hom.transpose(-1, -2)
    return p[..., :2] / p[..., 2:]


def _norm_from_px_xy(shape: tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, A^-1)``: pixel (x, y, 1) of a 2D image of ``shape`` -> norm (row, col, 1)."""
    swap = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    a = torch.from_numpy(norm_from_vox(tuple(shape))) @ swap
    return a.to(like.device, like.dtype), torch.linalg.inv(a).to(like.device, like.dtype)


def norm_from_px(h_px: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A pixel (x, y) homography (OpenCV's order) as the norm-frame (row, col) matrix of the same map
    on a 2D image of ``shape`` (moving and fixed share it). ``(3, 3)`` or ``(B, 3, 3)``."""
    a, a_inv = _norm_from_px_xy(shape, h_px)
    return a @ h_px @ a_inv


def px_from_norm(m: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`norm_from_px`, scaled so ``h33 = 1``."""
    a, a_inv = _norm_from_px_xy(shape, m)
    h = a_inv @ m @ a
    return h / h[..., 2:, 2:]


def corners_px(shape: tuple[int, ...]) -> torch.Tensor:
    """``(4, 2)`` float64 (x, y) pixel centres of the image corners: top-left, top-right,
    bottom-right, bottom-left (the order of :func:`napari_register.data.photos.patch_corners`)."""
    h, w = (float(s - 1) for s in shape)
    return torch.tensor([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]], dtype=torch.float64)


def corner_homography(offsets: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``H_px (B, 3, 3)`` (moving px from fixed px, (x, y)) that moves the image corners of
    :func:`corners_px` by ``offsets (B, 4, 2)`` px (x, y); zero offsets give the identity."""
    src = corners_px(shape).to(offsets.device)[None].expand(offsets.shape[0], 4, 2)
    return fit_homography(src, src.to(offsets.dtype) + offsets)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *S)`` with ``sigma`` voxels on every axis (replicate edges)."""
    if sigma <= 0:
        return x
    d = x.dim() - 2
    radius = max(int(3 * sigma + 0.5), 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    conv = F.conv3d if d == 3 else F.conv2d
    out = x
    for axis in range(d):
        shape = [1] * d
        shape[axis] = len(k1)
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), k1.view(1, 1, *shape).expand(x.shape[1], 1, *shape),
                   groups=x.shape[1])
    return out
