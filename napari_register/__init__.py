"""napari-register: deep-learning image registration in napari and from Python / the command line.

Public, Qt-free API::

    from napari_register import register, read_image
    result = register("moving.nii.gz", "fixed.nii.gz", method="optimize")
    result.warped, result.field, result.jacobian, result.fold_fraction
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "register": "api", "iter_register": "api", "RegistrationResult": "api", "homography_first": "api",
    "Cancelled": "progress",
    "read_image": "image", "write_image": "image", "Image": "image", "ImageError": "errors", "InputError": "errors",
    "list_methods": "methods.registry", "get_method": "methods.registry", "Progress": "progress",
    "DisplacementField": "transforms", "MatrixTransform": "transforms", "warp_image": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (as napari does to read the manifest) must not import torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'napari_register' has no attribute {name!r}")
