"""The coordinate convention, transforms, Jacobians and the ITK export."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_register.coords import (Geometry, apply_matrix, compose, identity_map, matrix_map, resize_image,
                                   resize_map, sample)
from napari_register.image import Image, to_sitk
from napari_register.transforms import DisplacementField, MatrixTransform, jacobian_determinant, warp_image


def _rotation_geometry(shape=(12, 14, 16)) -> Geometry:
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return Geometry(shape, (0.8, 1.1, 1.5), (3.0, -7.0, 11.0), rot)


def test_sample_known_shift():
    """grid_sample conversion: sampling at x + 1 voxel along each axis reads the next voxel."""
    img = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 1, 5, 6, 7)
    ident = identity_map((5, 6, 7))
    for axis, n in enumerate((5, 6, 7)):
        shifted = ident.clone()
        shifted[:, axis] += 1.0 / (n - 1)
        out = sample(img, shifted)
        inner = [slice(None)] * 5
        inner[2 + axis] = slice(0, n - 1)
        nxt = [slice(None)] * 5
        nxt[2 + axis] = slice(1, n)
        assert torch.allclose(out[tuple(inner)], img[tuple(nxt)], atol=1e-3)


def test_compose_translations_and_resize():
    ident = identity_map((9, 11))
    a = ident + torch.tensor([0.1, -0.05]).view(1, 2, 1, 1)
    b = ident + torch.tensor([-0.02, 0.03]).view(1, 2, 1, 1)
    ab = compose(a, b)
    assert torch.allclose(ab - ident, torch.tensor([0.08, -0.02]).view(1, 2, 1, 1).expand_as(ab), atol=1e-5)
    assert torch.allclose(resize_map(a, (17, 21)) - identity_map((17, 21)),
                          torch.tensor([0.1, -0.05]).view(1, 2, 1, 1).expand(1, 2, 17, 21), atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 48, 36), (77, 48, 36), (20, 24, 18)])
def test_resize_image_keeps_the_frame_and_smooths(shape):
    # a ramp along each axis stays the same function of the norm coordinate (no half-voxel shift),
    # away from the edge voxels, whose box averages are clamped to the grid
    big = (160, 96, 72)
    ident = identity_map(big)
    small = resize_image(ident, shape)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    assert torch.allclose(small[interior], identity_map(shape)[interior], atol=1e-5)
    # a Nyquist checkerboard averages out instead of aliasing
    z, y, x = torch.meshgrid(*[torch.arange(n) for n in big], indexing="ij")
    checker = ((z + y + x) % 2).float()[None, None]
    assert (resize_image(checker, shape) - 0.5).abs().max() < 1e-5


def test_apply_matrix_matches_the_points_and_homographies_divide():
    m = torch.tensor([[1.1, 0.1, -0.05], [0.02, 0.9, 0.1], [0.05, -0.1, 1.0]], dtype=torch.float64)
    pts = matrix_map(m, (5, 7)).flatten(2)[0].T  # (N, 2)
    ident = identity_map((5, 7), dtype=torch.float64).flatten(2)[0].T
    h = torch.cat([ident, torch.ones(len(ident), 1, dtype=torch.float64)], 1) @ m.T
    assert torch.allclose(pts, h[:, :2] / h[:, 2:], atol=1e-12)
    phi = identity_map((5, 7), dtype=torch.float64) + 0.01
    assert torch.allclose(apply_matrix(torch.eye(3, dtype=torch.float64), phi), phi)


def test_geometry_matches_sitk():
    g = _rotation_geometry()
    img = to_sitk(Image(np.zeros(g.shape, np.float32), g))
    vox = np.array([[2.0, 3.0, 4.0], [0.0, 0.0, 0.0], [11.0, 13.0, 15.0]])  # (z, y, x)
    ours = np.array([g.phys_from_vox()[:3, :3] @ v + g.phys_from_vox()[:3, 3] for v in vox])
    theirs = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(v[::-1])) for v in vox])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_jacobian_of_affine_is_its_determinant():
    g = _rotation_geometry((20, 22, 24))
    a = np.array([[1.1, 0.2, 0.0, 4.0], [0.05, 0.9, 0.1, -2.0], [0.0, -0.1, 1.2, 1.0], [0, 0, 0, 1]])
    field = MatrixTransform(a).to_field(g)
    jac = field.jacobian()
    np.testing.assert_allclose(jac, np.linalg.det(a[:3, :3]), rtol=1e-4)


def test_jacobian_folding_detected():
    g = Geometry.default((32, 32))
    y, x = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    disp = np.zeros((32, 32, 2), np.float32)
    disp[..., 0] = -2.5 * x * np.exp(-((x - 16) ** 2 + (y - 16) ** 2) / 20)  # strong local compression in x
    jac = jacobian_determinant(disp, g)
    assert (jac <= 0).any() and (jac > 0).mean() > 0.8


def test_points_roundtrip_and_inverse_field():
    g = _rotation_geometry((16, 18, 20))
    rng = np.random.default_rng(0)
    pts = g.points_phys()
    smooth = np.stack([np.sin(pts[..., 0] / 9.0), np.cos(pts[..., 1] / 11.0), np.sin(pts[..., 2] / 7.0)], -1)
    field = DisplacementField(g, (1.2 * smooth).astype(np.float32))
    inner = pts[4:-4, 4:-4, 4:-4].reshape(-1, 3)[rng.choice(8 * 10 * 12, 50, replace=False)]
    moved = field.moving_from_fixed(inner)
    assert np.abs(moved - inner).max() > 0.5
    np.testing.assert_allclose(field.fixed_from_moving(moved), inner, atol=1e-3)
    inv = field.invert()
    np.testing.assert_allclose(inv.moving_from_fixed(moved), inner, atol=0.05)


def test_warp_translation_and_labels_keep_label_set():
    g = Geometry((20, 24, 28), (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3))
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, g.shape).astype(np.int16)
    moving = Image(labels, g)
    t = MatrixTransform.translation([2.0, 1.0, 4.0])  # 2 voxels in x, 1 in y, 2 in z
    warped = warp_image(moving, t, g, labels=True)
    assert warped.array.dtype == np.int16
    assert set(np.unique(warped.array)) <= set(np.unique(labels))
    np.testing.assert_array_equal(warped.array[:-2, :-1, :-2], labels[2:, 1:, 2:])


def test_sitk_export_reproduces_our_warp(tmp_path):
    g = _rotation_geometry((14, 16, 18))
    pts = g.points_phys()
    disp = np.stack([2 * np.sin(pts[..., 1] / 6), 1.5 * np.cos(pts[..., 0] / 5), np.sin(pts[..., 2] / 4)], -1)
    field = DisplacementField(g, disp.astype(np.float32))
    mg = Geometry((20, 22, 24), (1.0, 0.9, 1.3), (0.0, -10.0, 5.0), np.eye(3))
    rng = np.random.default_rng(2)
    from scipy.ndimage import gaussian_filter

    moving = Image(gaussian_filter(rng.random(mg.shape), 2).astype(np.float32), mg)
    ours = warp_image(moving, field, g).array
    for name in ("field.nii.gz", "field.mha", "field.h5"):
        path = field.save(tmp_path / name)
        if name.endswith(".h5"):
            tx = sitk.ReadTransform(str(path))
        else:
            tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
        ref = to_sitk(Image(np.zeros(g.shape, np.float32), g))
        theirs = sitk.GetArrayFromImage(sitk.Resample(to_sitk(moving), ref, tx, sitk.sitkLinear, 0.0))
        inside = ours != 0
        assert inside.mean() > 0.3
        np.testing.assert_allclose(theirs[inside], ours[inside], atol=2e-3, err_msg=name)
