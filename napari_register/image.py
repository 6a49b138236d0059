"""Image record (array + physical geometry) and reading/writing.

NIfTI goes through nibabel, MHA/MHD/NRRD and DICOM series folders through SimpleITK, photos through
Pillow. Whatever the reader, the result is in ITK's physical convention (LPS, see :mod:`coords`) with
the array in (z, y, x) order, so a NIfTI read here equals SimpleITK reading the same file.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from .coords import Geometry

NIFTI_EXT = (".nii", ".nii.gz")
ITK_EXT = (".mha", ".mhd", ".nrrd", ".nhdr")
PHOTO_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# nibabel's RAS+ to ITK's LPS+: negate the first two physical axes.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ImageError(ValueError):
    """A file cannot be used as an image; the message names the file, the problem and the fix."""


@dataclass
class Image:
    """``array`` is ``geometry.shape`` (array order) or that plus a trailing channel axis
    (``channels=True``: RGB photos, channel-last stacks of binary label masks)."""

    array: np.ndarray
    geometry: Geometry
    channels: bool = False
    rgb: bool = False
    path: Optional[str] = None

    def __post_init__(self) -> None:
        spatial = self.array.shape[:-1] if self.channels else self.array.shape
        if tuple(spatial) != tuple(self.geometry.shape):
            raise ValueError(f"array shape {self.array.shape} does not match geometry shape {self.geometry.shape}"
                             f"{' plus a channel axis' if self.channels else ''}")

    @property
    def ndim(self) -> int:
        return self.geometry.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return self.geometry.shape

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "image"

    def luminance(self) -> np.ndarray:
        """Float32 scalar image the registration sees (Rec. 601 luma for RGB)."""
        if self.rgb:
            a = self.array[..., :3].astype(np.float32)
            return a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if self.channels:
            return self.array.astype(np.float32).mean(-1)
        return self.array.astype(np.float32)

    def with_array(self, array: np.ndarray, **kw) -> "Image":
        return replace(self, array=array, **kw)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_supported(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.is_dir():
        return _dicom_series(p) is not None
    return _suffix(p) in NIFTI_EXT + ITK_EXT + PHOTO_EXT


def read_image(path: str | os.PathLike, *, labels: bool = False) -> Image:
    """Read a NIfTI, MHA/MHD/NRRD, DICOM series folder or photo into an :class:`Image`.

    ``labels=True`` keeps integer values and accepts a 4D channel-last stack of binary masks.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder; check the path")
    suffix = _suffix(p)
    try:
        if p.is_dir():
            img = _read_dicom(p)
        elif suffix in NIFTI_EXT:
            img = _read_nifti(p, labels)
        elif suffix in ITK_EXT:
            img = _from_sitk(_sitk_read(p), str(p), labels)
        elif suffix in PHOTO_EXT:
            img = _read_photo(p)
        else:
            raise ImageError(f"{p}: unsupported file type {suffix!r}; use NIfTI (.nii, .nii.gz), "
                             f"{', '.join(ITK_EXT)}, a DICOM folder or a photo ({', '.join(PHOTO_EXT)})")
    except (ImageError, FileNotFoundError):
        raise
    except Exception as e:  # the libraries' own errors are cryptic; name the file and the likely cause
        raise ImageError(f"{p}: cannot read it as {suffix or 'an image'} ({type(e).__name__}: {e}); "
                         "the file may be truncated or not what its extension says") from e
    img.path = str(p)
    return img


def _read_nifti(p: Path, labels: bool) -> Image:
    import nibabel as nib

    nii = nib.load(str(p))
    data = np.asanyarray(nii.dataobj)  # raw dtype; get_fdata would turn labels into float64
    if data.ndim == 2:
        data = data[..., None]
    channels = False
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4 and labels:
        channels = True
    elif data.ndim > 3:
        raise ImageError(f"{p}: a {data.ndim}D volume of shape {data.shape}; registration takes one 2D or 3D "
                         "image: extract a single volume (time point/channel) first")
    if not labels and data.dtype.kind not in "fiu":
        raise ImageError(f"{p}: unsupported voxel type {data.dtype}")
    lps = LPS_FROM_RAS @ nii.affine
    lin = lps[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = lin / spacing
    spatial = data.shape[:3]
    # nibabel indexes (i, j, k) = (x, y, z); our arrays are (z, y, x).
    arr = np.transpose(data, (2, 1, 0, 3) if channels else (2, 1, 0))
    if spatial[2] == 1:  # a 2D NIfTI
        arr = arr[0]
        geom = Geometry(spatial[:2][::-1], spacing[:2], lps[:2, 3], direction[:2, :2])
    else:
        geom = Geometry(tuple(spatial[::-1]), spacing, lps[:3, 3], direction)
    return Image(np.ascontiguousarray(arr), geom, channels=channels)


def _sitk_read(p: Path):
    import SimpleITK as sitk

    return sitk.ReadImage(str(p))


def _dicom_series(p: Path) -> Optional[list[str]]:
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    if not ids:
        return None
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0]))


def _read_dicom(p: Path) -> Image:
    import SimpleITK as sitk

    files = _dicom_series(p)
    if not files:
        raise ImageError(f"{p}: a folder without a DICOM series; open a folder of .dcm slices or a single file")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _from_sitk(reader.Execute(), str(p), labels=False)


def _from_sitk(img, path: Optional[str], labels: bool) -> Image:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    d = img.GetDimension()
    ncomp = img.GetNumberOfComponentsPerPixel()
    if d > 3:
        raise ImageError(f"{path}: a 4D image; extract one volume first")
    if d == 3 and img.GetSize()[2] == 1:  # a single slice stored as 3D
        arr = arr[0]
        geom = Geometry(arr.shape[:2] if ncomp > 1 else arr.shape, img.GetSpacing()[:2], img.GetOrigin()[:2],
                        np.asarray(img.GetDirection()).reshape(3, 3)[:2, :2])
    else:
        geom = Geometry(arr.shape[:d], img.GetSpacing(), img.GetOrigin(), np.asarray(img.GetDirection()).reshape(d, d))
    channels = ncomp > 1
    return Image(arr, geom, channels=channels, rgb=channels and ncomp in (3, 4) and not labels, path=path)


def _read_photo(p: Path) -> Image:
    from PIL import Image as PILImage

    with PILImage.open(p) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I", "F", "L"):
            arr = np.asarray(im)
            rgb = False
        else:
            arr = np.asarray(im.convert("RGB"))
            rgb = True
    return Image(arr, Geometry.default(arr.shape[:2]), channels=rgb, rgb=rgb)


def from_sitk(img, labels: bool = False) -> Image:
    """:class:`Image` from a SimpleITK image (geometry kept; vector pixels become channels)."""
    return _from_sitk(img, None, labels)


def to_sitk(image: Image):
    """SimpleITK image with the same geometry (vector image when ``channels``)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(image.array, isVector=image.channels)
    g = image.geometry
    img.SetSpacing(g.spacing)
    img.SetOrigin(g.origin)
    img.SetDirection(tuple(g.direction.ravel()))
    return img


def write_image(image: Image, path: str | os.PathLike, *, protect: tuple[str, ...] = ()) -> Path:
    """Write ``image`` keeping spacing, origin and direction. Refuses to write over any path in
    ``protect`` (the files the user opened)."""
    p = Path(path)
    for q in protect:
        if q and Path(q).exists() and p.exists() and p.resolve() == Path(q).resolve():
            raise ImageError(f"{p}: refusing to overwrite an input file; choose another output location")
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(p)
    if suffix in NIFTI_EXT:
        _write_nifti(image, p)
    elif suffix in ITK_EXT:
        import SimpleITK as sitk

        sitk.WriteImage(to_sitk(image), str(p), useCompression=True)
    elif suffix in PHOTO_EXT:
        from PIL import Image as PILImage

        arr = image.array
        if arr.dtype != np.uint8:
            from .intensity import normalise

            arr = (normalise(arr) * 255).astype(np.uint8)
        PILImage.fromarray(arr).save(p)
    else:
        raise ImageError(f"{p}: cannot write {suffix!r}; use .nii.gz, .nii, .mha, .nrrd or .png")
    return p


def _write_nifti(image: Image, p: Path) -> None:
    import nibabel as nib

    g = image.geometry
    d = g.ndim
    m = np.eye(4)
    m[:d, :d] = g.direction @ np.diag(g.spacing)
    m[:d, 3] = g.origin
    affine = LPS_FROM_RAS @ m  # LPS -> RAS (the same sign flip both ways)
    arr = image.array
    if d == 2:
        arr = arr[None]
    arr = np.transpose(arr, (2, 1, 0, 3) if image.channels else (2, 1, 0))
    nii = nib.Nifti1Image(np.ascontiguousarray(arr), affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    nib.save(nii, str(p))


def check_registrable(image: Image, role: str) -> None:
    """Raise :class:`ImageError` for images no method can register (NaN, empty, constant)."""
    where = f"{role} image {image.path or ''}".strip()
    if image.array.size == 0 or min(image.shape) < 2:
        raise ImageError(f"{where}: empty or degenerate shape {image.array.shape}; it needs at least 2 voxels per axis")
    if image.ndim not in (2, 3):
        raise ImageError(f"{where}: {image.ndim}D; only 2D and 3D images can be registered")
    lum = image.luminance()
    if not np.isfinite(lum).all():
        raise ImageError(f"{where}: contains NaN or infinite values; fill them (e.g. with 0) before registering")
    if float(lum.max()) == float(lum.min()):
        raise ImageError(f"{where}: constant image (every voxel {float(lum.min())}); nothing to align - "
                         "check that the right file was opened")


def read_points(path: str | Path, ndim: int) -> np.ndarray:
    """Points CSV: a header row with columns ``X,Y[,Z]`` (physical; pixels for photos), others ignored."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such points file")
    with open(p, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{p}: empty points file; expected a header row with columns X,Y[,Z]")
    header = [h.strip().upper() for h in rows[0]]
    names = ["X", "Y", "Z"][:ndim]
    missing = [n for n in names if n not in header]
    if missing:
        raise ValueError(f"{p}: no column(s) {', '.join(missing)} in header {rows[0]}; "
                         f"a {ndim}D points file needs columns {','.join(names)}")
    idx = [header.index(n) for n in names]
    try:
        pts = np.array([[float(r[i]) for i in idx] for r in rows[1:] if any(c.strip() for c in r)])
    except (ValueError, IndexError) as e:
        raise ValueError(f"{p}: a row is not numeric in columns {','.join(names)} ({e})") from None
    return pts.reshape(-1, ndim)
