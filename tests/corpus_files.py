"""The files of the bad-input corpus (tests/bad_inputs.py): small images, hand-made headers, DICOM
series and checkpoints, written on demand."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Optional

import numpy as np

PAYLOAD_MARKER = "PAYLOAD_RAN"  # the pickle payload would create this file in the case folder


def volume(shape: tuple[int, ...] = (16, 16, 16), seed: int = 0, shift: int = 0) -> np.ndarray:
    """A smooth random image (something to register), float32."""
    from scipy.ndimage import gaussian_filter

    a = gaussian_filter(np.random.default_rng(seed).random(shape), 2).astype(np.float32)
    return np.roll(a, shift, axis=0)


def nifti(path: Path, arr: np.ndarray, affine: Optional[np.ndarray] = None, pixdim: Any = None) -> Path:
    """Write ``arr`` (nibabel's x, y, z order) as ``.nii.gz`` with ``affine``; ``pixdim``: raw spacing
    in a header whose geometry comes from pixdim alone (no sform/qform), as old converters write."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    if pixdim is not None:  # nibabel writes a consistent header: patch the raw bytes
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[80:92] = np.asarray(pixdim, "<f4").tobytes()  # pixdim[1:4] (float32 from byte 76)
        raw[252:256] = np.zeros(2, "<i2").tobytes()  # qform_code, sform_code = 0: pixdim alone
        path.write_bytes(gzip.compress(bytes(raw)))
    return path


def photo(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


def grey_photo(seed: int = 0, shift: int = 0) -> np.ndarray:
    return (volume((32, 32), seed, shift) * 255 / volume((32, 32), seed).max()).astype(np.uint8)


def mha(path: Path, arr: np.ndarray, spacing: str = "1 1 1", matrix: str = "1 0 0 0 1 0 0 0 1",
        dims: Optional[str] = None) -> Path:
    """A MetaImage written by hand, so the header can say what no writer would."""
    dims = dims or " ".join(str(s) for s in arr.shape[::-1])
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"TransformMatrix = {matrix}\nOffset = 0 0 0\nElementSpacing = {spacing}\nDimSize = {dims}\n"
              "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + arr.astype("<f4").tobytes())
    return path


def dicom_series(folder: Path, arr: np.ndarray, uid: str, start: int = 0) -> None:
    """Slices of ``arr`` (z, y, x) as DICOM files of one series ``uid``."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        sl = img[:, :, k]
        for tag, value in (("0020|0032", f"0\\0\\{k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k)),
                           ("0020|000e", uid), ("0008|0060", "MR")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{start + k:03d}.dcm"))
        writer.Execute(sl)


def pair(folder: Path, dim: int = 3) -> tuple[Path, Path]:
    """A good moving/fixed pair in ``folder/in``: 16^3 NIfTI volumes or 32^2 grey photos."""
    if dim == 2:
        return (photo(folder / "in/moving.png", grey_photo(0, 2)), photo(folder / "in/fixed.png", grey_photo(0)))
    return nifti(folder / "in/moving.nii.gz", volume(shift=2)), nifti(folder / "in/fixed.nii.gz", volume())


def checkpoint_blob(name: str = "carl-2d") -> dict:
    from napari_register import weights

    return weights.read_blob(weights.CHECKPOINT_DIR / f"{name}.pt")


class Payload:
    """Unpickling this calls ``open(path, "w")``: a file appears if the payload ever runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))
