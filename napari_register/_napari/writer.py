"""npe2 writers: an image/labels layer with its physical geometry (NIfTI, MHA, NRRD), the
displacement field of the run that made a result layer (ITK transform file, or a vector image), and
that run's homography (3x3 text, as the CLI's ``homography.txt``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import OutputError, output_error
from ..image import Image, write_image
from .layers import META_KEY, geometry_from_meta

FIELD_SUFFIXES = (".h5", ".hdf5", ".tfm")


def write_layer(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Image/Labels layer keeping spacing, origin and direction (from scale/translate/affine)."""
    rgb = bool(meta.get("rgb", False))
    arr = np.asarray(data[0] if meta.get("multiscale") else data)
    shape = arr.shape[:-1] if rgb else arr.shape
    image = Image(arr, geometry_from_meta(shape, meta), channels=rgb, rgb=rgb)
    # never overwrite the file a layer was opened from
    source = (meta.get("metadata") or {}).get("path")
    if source and Path(source).exists() and Path(path).exists() and Path(path).resolve() == Path(source).resolve():
        raise OutputError(f"{path}: refusing to overwrite the file layer {meta.get('name')!r} was opened from; "
                          "save it under another name")
    return [str(_atomic_write(Path(path), lambda tmp: write_image(image, tmp)))]


def _atomic_write(path: Path, writer: Callable[[Path], Any]) -> Path:
    """Write through a temporary file renamed onto ``path``: a failed save leaves no half file."""
    from ..outputs import atomic_path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            writer(tmp)
    except OSError as e:
        raise output_error(e, path) from None
    return path


def write_field(path: str, data: Any, meta: dict) -> list[str]:
    """Write the displacement field (mm, physical x,y,z, on the fixed grid) of the run behind a
    result layer: ``.h5``/``.tfm`` as an ITK transform, ``.nii.gz``/``.mha``/``.nrrd`` as a vector image."""
    info = (meta.get("metadata") or {}).get(META_KEY) or {}
    field = info.get("field")
    if field is None:
        raise ValueError(f"layer {meta.get('name')!r} is not a registration result; select a layer made "
                         "by the Register widget (warped, grid, Jacobian...) to save its displacement field")
    return [str(_atomic_write(Path(path), field.save))]


def write_homography(path: str, data: Any, meta: dict) -> list[str]:
    """Write the homography (or affine) matrix of the run behind a result layer as 3x3 text,
    moving_phys_from_fixed_phys: what ``register --prealign`` reads back."""
    from ..transforms import MatrixTransform

    info = (meta.get("metadata") or {}).get(META_KEY) or {}
    if "run" not in info:
        raise ValueError(f"layer {meta.get('name')!r} is not a registration result; select a layer made "
                         "by the Register widget (warped, grid, Jacobian...) to save its homography")
    if info.get("matrix") is None:
        raise ValueError(f"run #{info['run']} has no homography: its method gave a dense field only; save "
                         "the displacement field (.h5/.tfm) instead, or run a homography method (art, alto)")
    return [str(_atomic_write(Path(path), MatrixTransform(np.asarray(info["matrix"])).save_txt))]
