"""Reading and writing keep spacing, origin and direction; bad input gets a clear error."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_register.coords import Geometry
from napari_register.errors import OutputError
from napari_register.image import Image, ImageError, check_registrable, read_image, to_sitk, write_image

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def _oblique() -> Geometry:
    a = np.deg2rad(15)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]) @ np.diag([1, -1, 1])
    return Geometry((7, 9, 11), (0.7, 1.2, 2.5), (-12.5, 30.0, 4.25), rot)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_roundtrip_keeps_geometry(tmp_path, ext):
    g = _oblique()
    arr = np.random.default_rng(0).random(g.shape).astype(np.float32)
    p = write_image(Image(arr, g), tmp_path / f"img{ext}")
    back = read_image(p)
    np.testing.assert_allclose(back.array, arr)
    np.testing.assert_allclose(back.geometry.spacing, g.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, g.origin, atol=1e-5)
    np.testing.assert_allclose(back.geometry.direction, g.direction, atol=1e-6)


def test_nibabel_and_sitk_agree_on_real_nifti(tmp_path):
    """A NIfTI read through nibabel gives SimpleITK's (LPS) origin, direction and array order."""
    g = _oblique()
    p = write_image(Image(np.arange(np.prod(g.shape), dtype=np.float32).reshape(g.shape), g), tmp_path / "x.nii.gz")
    paths = [p, SAMPLE / "brain" / "fixed.nii.gz"]
    for path in paths:
        ours = read_image(path)
        theirs = sitk.ReadImage(str(path))
        np.testing.assert_allclose(ours.geometry.origin, theirs.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(ours.geometry.direction.ravel(), theirs.GetDirection(), atol=1e-5)
        np.testing.assert_allclose(ours.geometry.spacing, theirs.GetSpacing(), rtol=1e-6)
        np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(theirs))


def test_dicom_series_folder(tmp_path):
    g = Geometry((5, 16, 12), (0.5, 0.5, 2.0), (10.0, -20.0, 30.0), np.eye(3))
    arr = (np.random.default_rng(1).random(g.shape) * 1000).astype(np.int16)
    img = to_sitk(Image(arr, g))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(g.shape[0]):
        sl = img[:, :, k]
        for tag, value in (("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k)),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0008|0060", "MR")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    back = read_image(tmp_path)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.geometry.spacing, g.spacing, atol=1e-4)
    np.testing.assert_allclose(back.geometry.origin, g.origin, atol=1e-4)


def test_photo_rgb_kept_and_luminance():
    img = read_image(SAMPLE / "histology" / "fixed.jpg")
    assert img.rgb and img.array.shape[-1] == 3 and img.ndim == 2
    assert img.geometry.spacing == (1.0, 1.0) and img.geometry.origin == (0.0, 0.0)
    lum = img.luminance()
    assert lum.shape == img.shape and lum.dtype == np.float32


def test_channel_last_label_stack(tmp_path):
    masks = np.zeros((6, 7, 8, 3), np.uint8)
    masks[1:3, 2:4, 3:5, 0] = 1
    nib.save(nib.Nifti1Image(masks, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    lab = read_image(tmp_path / "lab.nii.gz", labels=True)
    assert lab.channels and lab.array.shape == (8, 7, 6, 3)
    with pytest.raises(ImageError, match="4D volume"):
        read_image(tmp_path / "lab.nii.gz")


def test_errors_name_file_and_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        read_image(tmp_path / "missing.nii.gz")
    src = SAMPLE / "brain" / "fixed.nii.gz"
    trunc = tmp_path / "truncated.nii.gz"
    trunc.write_bytes(src.read_bytes()[:5000])
    with pytest.raises(ImageError, match="truncated.nii.gz.*truncated"):
        read_image(trunc).array.sum()
    junk = tmp_path / "junk.mha"
    junk.write_text("not an image")
    with pytest.raises(ImageError, match="junk.mha"):
        read_image(junk)
    with pytest.raises(ImageError, match="unsupported file type"):
        read_image(_touch(tmp_path / "a.xyz"))
    g = Geometry.default((8, 8))
    with pytest.raises(ImageError, match="NaN"):
        check_registrable(Image(np.full((8, 8), np.nan, np.float32), g, path="nan.png"), "moving")
    with pytest.raises(ImageError, match="constant"):
        check_registrable(Image(np.ones((8, 8), np.float32), g, path="flat.png"), "fixed")


def _touch(p: Path) -> Path:
    p.write_text("x")
    return p


def test_write_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "in.nii.gz"
    shutil.copyfile(SAMPLE / "brain" / "fixed_seg.nii.gz", src)
    before = src.read_bytes()
    img = read_image(src)
    with pytest.raises(OutputError, match="overwrite"):
        write_image(img, src, protect=(str(src),))
    assert src.read_bytes() == before
