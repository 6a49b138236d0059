"""The one bridge between the core's physical geometry and napari layers.

napari world coordinates are the physical (ITK LPS) coordinates in *array order* (z, y, x), so every
layer made here overlays every other one in physical space. Read a layer back with
:func:`geometry_from_layer`; make one with :func:`layer_kwargs`. Nothing else converts.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..coords import Geometry, apply_h
from ..image import Image

LayerData = tuple  # napari LayerDataTuple: (data, kwargs, layer_type)
META_KEY = "napari_register"  # layer.metadata[META_KEY]: {"run", "role", "field", "matrix"}


def _reverse_rows(d: int) -> np.ndarray:
    """Homogeneous ``(d+1, d+1)`` permutation: physical (x, y, z) <-> world (z, y, x)."""
    m = np.eye(d + 1)
    m[:d, :d] = np.eye(d)[::-1]
    return m


def world_from_vox(geometry: Geometry) -> np.ndarray:
    """Homogeneous matrix: array-order voxel index -> napari world (physical z, y, x)."""
    return _reverse_rows(geometry.ndim) @ geometry.phys_from_vox()


def layer_kwargs(geometry: Geometry) -> dict[str, Any]:
    """``scale``/``translate`` (identity direction) or ``affine`` (any direction) for a napari layer."""
    if np.allclose(geometry.direction, np.eye(geometry.ndim)):
        return {"scale": tuple(geometry.spacing[::-1]), "translate": tuple(geometry.origin[::-1])}
    return {"affine": world_from_vox(geometry)}


def world_from_data(layer: Any) -> np.ndarray:
    """The layer's full data -> world homogeneous matrix (scale, translate, rotate, shear and affine)."""
    from napari.utils.transforms import Affine

    physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear)
    return np.asarray(layer.affine.affine_matrix) @ physical.affine_matrix


def geometry_from_matrix(shape: Sequence[int], world_from_vox_matrix: np.ndarray) -> Geometry:
    """Inverse of :func:`world_from_vox`: spacing = column lengths, direction = unit columns."""
    d = len(shape)
    phys = _reverse_rows(d) @ np.asarray(world_from_vox_matrix, dtype=np.float64)
    # phys_from_vox linear part = direction @ diag(spacing) @ reverse; undo the column reversal
    lin = phys[:d, :d] @ np.eye(d)[::-1]
    spacing = np.linalg.norm(lin, axis=0)
    return Geometry(tuple(shape), tuple(spacing), tuple(phys[:d, d]), lin / spacing)


def geometry_from_layer(layer: Any) -> Geometry:
    """Geometry of an Image/Labels layer, whichever reader opened it (RGB: the two spatial axes)."""
    shape = _spatial_shape(layer)
    return geometry_from_matrix(shape, world_from_data(layer))


def geometry_from_meta(shape: Sequence[int], meta: dict[str, Any]) -> Geometry:
    """Same as :func:`geometry_from_layer` from a writer's ``meta`` dict (layer state)."""
    from napari.utils.transforms import Affine

    d = len(shape)
    physical = Affine(scale=meta.get("scale", (1,) * d), translate=meta.get("translate", (0,) * d),
                      rotate=meta.get("rotate"), shear=meta.get("shear"))
    affine = meta.get("affine")
    affine = np.eye(d + 1) if affine is None else np.asarray(getattr(affine, "affine_matrix", affine))
    return geometry_from_matrix(shape, affine @ physical.affine_matrix)


def _spatial_shape(layer: Any) -> tuple[int, ...]:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def image_from_layer(layer: Any) -> Image:
    """An Image/Labels layer as a core :class:`Image` (full resolution, physical geometry)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    rgb = bool(getattr(layer, "rgb", False))
    path = getattr(getattr(layer, "source", None), "path", None)
    return Image(np.asarray(data), geometry_from_layer(layer), channels=rgb, rgb=rgb, path=path)


def image_layer(image: Image, name: str, layer_type: str = "image", **kwargs: Any) -> LayerData:
    """A core :class:`Image` as a napari layer-data tuple in its physical place."""
    data = image.array
    if layer_type == "labels":
        data = labels_array(image)
    elif image.rgb:
        kwargs.setdefault("rgb", True)
    return data, {"name": name, **layer_kwargs(image.geometry), **kwargs}, layer_type


def labels_array(image: Image) -> np.ndarray:
    """Integer label map for a Labels layer (a channel stack of masks becomes labels 1..C)."""
    arr = image.array
    if image.channels:  # channel-last binary masks -> the first set channel's index + 1
        on = arr > 0.5
        arr = np.where(on.any(-1), on.argmax(-1) + 1, 0)
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    return arr.astype(np.int32 if arr.max(initial=0) > 255 else np.uint8)


def points_phys(layer: Any) -> np.ndarray:
    """A Points layer's points in physical (x, y[, z]) coordinates ``(N, d)``."""
    data = np.asarray(layer.data, dtype=np.float64)
    return apply_h(world_from_data(layer), data)[:, ::-1]


def points_layer(points_phys_xyz: np.ndarray, geometry: Geometry, name: str, **kwargs: Any) -> LayerData:
    """Physical points ``(N, d)`` as a Points layer placed like ``geometry``'s image layers."""
    vox = apply_h(geometry.vox_from_phys(), np.asarray(points_phys_xyz, dtype=np.float64))
    return vox, {"name": name, **layer_kwargs(geometry), **kwargs}, "points"


def same_place(layer_a: Any, layer_b: Any) -> bool:
    """Whether two layers share one data -> world transform (overlay voxel for voxel)."""
    return np.allclose(world_from_data(layer_a), world_from_data(layer_b))


def run_metadata(run: int, role: str, field: Optional[Any] = None, matrix: Optional[np.ndarray] = None) -> dict[str, Any]:
    """``metadata`` of a result layer: which run made it, its role, the run's displacement field and,
    for a run with one, its homography or affine matrix (moving_phys_from_fixed_phys)."""
    return {META_KEY: {"run": run, "role": role, "field": field, "matrix": matrix}}
