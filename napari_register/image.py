"""Image record (array + physical geometry) and reading/writing.

NIfTI goes through nibabel, MHA/MHD/NRRD and DICOM series folders through SimpleITK, photos through
Pillow. Whatever the reader, the result is in ITK's physical convention (LPS, see :mod:`coords`) with
the array in (z, y, x) order, so a NIfTI read here equals SimpleITK reading the same file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from .coords import Geometry
from .errors import ImageError, InputError, OutputError, missing
from .resources import check_file_size

NIFTI_EXT = (".nii", ".nii.gz")
ITK_EXT = (".mha", ".mhd", ".nrrd", ".nhdr")
PHOTO_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# nibabel's RAS+ to ITK's LPS+: negate the first two physical axes.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def file_suffix(path: Path) -> str:
    """The lower-case extension, ``.nii.gz`` counted as one."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_supported(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.is_dir():  # any DICOM: a folder of two series is ours too, so that reading it says why not
        return bool(_series_ids(p))
    return file_suffix(p) in NIFTI_EXT + ITK_EXT + PHOTO_EXT


def read_image(path: str | os.PathLike, *, labels: bool = False) -> Image:
    """Read a NIfTI, MHA/MHD/NRRD, DICOM series folder or photo into an :class:`Image`.

    ``labels=True`` keeps integer values and accepts a 4D channel-last stack of binary masks.
    Anything wrong with the file raises :class:`ImageError` (a missing path :class:`MissingFileError`),
    naming the file; the size a header declares is checked before any voxel is read.
    """
    p = Path(path)
    if not p.exists():
        raise missing(p)
    suffix = file_suffix(p)
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
    except InputError:
        raise
    except Exception as e:  # the libraries' own errors are cryptic; name the file and the likely cause
        raise ImageError(f"{p}: cannot read it as {suffix or 'an image'} ({type(e).__name__}: {_first_line(e)}); "
                         "the file may be truncated or not what its extension says") from e
    img.path = str(p)
    return img


def _first_line(e: BaseException) -> str:
    """The gist of a library's (often multi-line) message, for a one-line error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    gist = next((ln for ln in lines if "ERROR" in ln), lines[0] if lines else "")
    return gist[:200]


def checked_geometry(where: str, shape: tuple[int, ...], spacing, origin, direction) -> Geometry:
    """A :class:`Geometry`, or :class:`ImageError` naming ``where`` for spacing, origin or direction no
    registration can use (zero, negative or NaN spacing, a singular direction matrix)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    direction = np.asarray(direction, dtype=np.float64)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ImageError(f"{where}: voxel spacing {tuple(spacing.tolist())} is not positive; the header is wrong - "
                         "fix the spacing (pixdim / ElementSpacing) in the header, e.g. with SimpleITK or nibabel")
    if not np.isfinite(origin).all():
        raise ImageError(f"{where}: origin {tuple(origin.tolist())} is not finite; fix the origin in the header")
    # direction columns are unit vectors, so |det| is the volume they span: ~0 means two axes coincide
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-3:
        raise ImageError(f"{where}: the direction matrix {direction.round(4).tolist()} is singular (two image axes "
                         "point the same way); fix the orientation (sform/qform, TransformMatrix) in the header")
    return Geometry(tuple(shape), tuple(spacing), tuple(origin), direction)


def _read_nifti(p: Path, labels: bool) -> Image:
    import nibabel as nib
    from nibabel.imageglobals import logger

    # nibabel logs the header fixes it makes (to stderr); we refuse those that matter ourselves
    disabled, logger.disabled = logger.disabled, True
    try:
        nii = nib.load(str(p))
    finally:
        logger.disabled = disabled
    _check_nifti_header(p, nii)
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
        raise ImageError(f"{p}: unsupported voxel type {data.dtype}; convert it to integers or floats")
    lps = LPS_FROM_RAS @ nii.affine
    lin = lps[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        direction = lin / spacing  # a zero column gives NaN: refused by checked_geometry
    spatial = data.shape[:3]
    # nibabel indexes (i, j, k) = (x, y, z); our arrays are (z, y, x).
    arr = np.transpose(data, (2, 1, 0, 3) if channels else (2, 1, 0))
    if spatial[2] == 1:  # a 2D NIfTI
        arr = arr[0]
        geom = checked_geometry(str(p), spatial[:2][::-1], spacing[:2], lps[:2, 3], direction[:2, :2])
    else:
        geom = checked_geometry(str(p), tuple(spatial[::-1]), spacing, lps[:3, 3], direction)
    return Image(np.ascontiguousarray(arr), geom, channels=channels)


def _check_nifti_header(p: Path, nii) -> None:
    """Refuse, before reading the voxels, a NIfTI whose header declares more voxels than fit in
    memory, or whose spacing nibabel would silently repair (it turns a zero pixdim into 1 and a
    negative one into its absolute value: the image would be registered at a made-up scale)."""
    from nibabel.openers import ImageOpener

    check_file_size(p, nii.shape, nii.get_data_dtype().itemsize)
    with ImageOpener(str(p)) as f:
        raw = type(nii.header).from_fileobj(f, check=False)
    if int(raw["sform_code"]) > 0:
        return  # the sform sets the geometry (checked_geometry checks it); pixdim is not used
    nd = min(max(int(raw["dim"][0]), 1), 3)
    pixdim = np.asarray(raw["pixdim"][1:nd + 1], dtype=np.float64)
    if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
        raise ImageError(f"{p}: voxel spacing (pixdim) {tuple(pixdim.tolist())} is not positive; the header is "
                         "wrong - set the real spacing in the header (e.g. nibabel: img.header.set_zooms)")


def _sitk_read(p: Path):
    """SimpleITK read, after the header's size, spacing and direction pass (ITK's own refusals are
    multi-line C++ messages, and it would allocate whatever size the header declares)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()
    _check_sitk_header(str(p), reader)
    return reader.Execute()


def _check_sitk_header(where: str, reader, slices: int = 1) -> None:
    """Size (times ``slices`` for a DICOM series), spacing and direction from a reader's header."""
    import SimpleITK as sitk

    size = list(reader.GetSize())
    d = len(size)
    if slices > 1:
        size[-1] = size[-1] * slices if d == 3 else slices
    ncomp = reader.GetNumberOfComponents()
    itemsize = max(sitk.Image([1] * d, reader.GetPixelID()).GetSizeOfPixelComponent(), 1) if d <= 3 else 8
    check_file_size(where, size[::-1] + ([ncomp] if ncomp > 1 else []), itemsize)
    if d > 3:
        raise ImageError(f"{where}: a {d}D image of size {tuple(size)}; registration takes one 2D or 3D image: "
                         "extract a single volume (time point/channel) first")
    spacing = np.asarray(reader.GetSpacing())
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ImageError(f"{where}: voxel spacing {tuple(spacing.tolist())} is not positive (a NaN reads as 0); "
                         "the header is wrong - set the real spacing (ElementSpacing / space directions)")
    direction = np.asarray(reader.GetDirection()).reshape(d, d)
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-3:
        raise ImageError(f"{where}: the direction matrix {direction.round(4).tolist()} is singular (two image axes "
                         "point the same way); fix the orientation (TransformMatrix / space directions)")


def _series_ids(p: Path) -> list[str]:
    """DICOM series UIDs in folder ``p``, without ITK's "No Series were found" warning on stderr."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _dicom_series(p: Path) -> Optional[list[str]]:
    """Files of the DICOM series in folder ``p`` (None: no DICOM); more than one series is refused."""
    import SimpleITK as sitk

    ids = _series_ids(p)
    if not ids:
        return None
    if len(ids) > 1:
        counts = ", ".join(f"{i} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), i))} files)"
                           for i in ids)
        raise ImageError(f"{p}: {len(ids)} DICOM series in one folder ({counts}); which to register is "
                         "ambiguous - move each series into a folder of its own and open that folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0]))


def _read_dicom(p: Path) -> Image:
    import SimpleITK as sitk

    files = _dicom_series(p)
    if not files:
        raise ImageError(f"{p}: a folder without a DICOM series; open a folder of .dcm slices or a single file")
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    _check_sitk_header(str(p), first, slices=len(files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _from_sitk(reader.Execute(), str(p), labels=False)


def _from_sitk(img, path: Optional[str], labels: bool) -> Image:
    import SimpleITK as sitk

    where = path or "SimpleITK image"
    d = img.GetDimension()
    if d > 3:
        raise ImageError(f"{where}: a {d}D image of size {img.GetSize()}; extract one volume first")
    arr = sitk.GetArrayFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if d == 3 and img.GetSize()[2] == 1:  # a single slice stored as 3D
        arr = arr[0]
        geom = checked_geometry(where, arr.shape[:2] if ncomp > 1 else arr.shape, img.GetSpacing()[:2],
                                img.GetOrigin()[:2], np.asarray(img.GetDirection()).reshape(3, 3)[:2, :2])
    else:
        geom = checked_geometry(where, arr.shape[:d], img.GetSpacing(), img.GetOrigin(),
                                np.asarray(img.GetDirection()).reshape(d, d))
    channels = ncomp > 1
    return Image(arr, geom, channels=channels, rgb=channels and ncomp in (3, 4) and not labels, path=path)


def _read_photo(p: Path) -> Image:
    from PIL import Image as PILImage

    with PILImage.open(p) as im:
        width, height = im.size  # from the header; nothing decoded yet
        check_file_size(p, (height, width, len(im.getbands())), 4)
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
            raise OutputError(f"{p}: refusing to overwrite an input file; choose another output location")
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = file_suffix(p)
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
        raise OutputError(f"{p}: cannot write {suffix!r}; use .nii.gz, .nii, .mha, .nrrd or .png")
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
    """Raise :class:`ImageError` for images no method can register (NaN, empty, constant, a
    geometry with zero or NaN spacing or a singular direction)."""
    where = f"{role} image {image.path or ''}".strip()
    if image.array.size == 0 or min(image.shape) < 2:
        raise ImageError(f"{where}: too small to register ({'x'.join(map(str, image.shape))} voxels); it needs at "
                         "least 2 voxels along each axis - check that the right file was opened")
    if image.ndim not in (2, 3):
        raise ImageError(f"{where}: {image.ndim}D; only 2D and 3D images can be registered")
    g = image.geometry
    checked_geometry(where, g.shape, g.spacing, g.origin, g.direction)
    lum = image.luminance()
    if not np.isfinite(lum).all():
        bad = int((~np.isfinite(lum)).sum())
        raise ImageError(f"{where}: {bad} voxel{'s are' if bad > 1 else ' is'} NaN or infinite; fill them "
                         "(e.g. with 0) before registering")
    if float(lum.max()) == float(lum.min()):
        raise ImageError(f"{where}: constant image (every voxel {float(lum.min())}); nothing to align - "
                         "check that the right file was opened")


def check_labels(labels: Image, role: str) -> None:
    """Raise :class:`ImageError` for a label map with no label at all (Dice on it means nothing)."""
    arr = labels.array
    if arr.size == 0 or not np.any(np.nan_to_num(arr) if arr.dtype.kind == "f" else arr):
        where = f"{role} label map {labels.path or ''}".strip()
        raise ImageError(f"{where}: no labels (every voxel is 0); check that the right file was opened, "
                         "or leave the label map out")
