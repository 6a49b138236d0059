"""The pipeline on a real brain: identity, a known translation, a known smooth deformation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_register import Cancelled, iter_register, list_methods, register
from napari_register.coords import Geometry
from napari_register.image import Image, ImageError, read_image
from napari_register.metrics import dice
from napari_register.transforms import DisplacementField, MatrixTransform, warp_image

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
# Smaller grids than the defaults (speed) and a wider update smoothing, which suits these globally
# smooth synthetic motions (the defaults are tuned on real inter-subject brains).
FAST = {"levels": [2, 1], "iterations": [60, 30], "sigma": 2.0}


@pytest.fixture(scope="module")
def brain() -> tuple[Image, Image]:
    """The sample brain and its labels at half resolution (2 mm), a real image kept small for speed."""
    img = read_image(SAMPLE / "brain" / "fixed.nii.gz")
    lab = read_image(SAMPLE / "brain" / "fixed_seg.nii.gz", labels=True)
    g = img.geometry
    small = Geometry(tuple(s // 2 for s in g.shape), tuple(2 * s for s in g.spacing),
                     tuple(g.origin + g.direction @ (np.asarray(g.spacing) * 0.5)), g.direction)
    ident = MatrixTransform(np.eye(4))
    return warp_image(img, ident, small), warp_image(lab, ident, small, labels=True)


def test_registry_lists_optimize_and_rejects_unknown():
    assert "optimize" in list_methods(2) and "optimize" in list_methods(3)
    with pytest.raises(ValueError, match="known methods: .*optimize"):
        register(SAMPLE / "brain" / "moving.nii.gz", SAMPLE / "brain" / "fixed.nii.gz", method="nope")


def test_identity_pair_gives_zero_field(brain):
    img, _ = brain
    res = register(img, img, options=FAST, device="cpu")
    vox = np.linalg.norm(res.field.disp, axis=-1) / 2.0  # in 2 mm voxels
    brain_mask = img.array > 0.1 * img.array.max()
    # Not exactly 0: LNCC's variance floor (eps) gives flat patches a small pull; measured 0.09 mean.
    assert vox[brain_mask].mean() < 0.15 and np.percentile(vox, 99) < 1.0, (vox.mean(), vox.max())
    assert res.fold_fraction == 0.0
    assert abs(float(np.median(res.jacobian.array)) - 1) < 1e-2


def _smooth_field(g: Geometry, amplitude: float, seed: int = 0) -> DisplacementField:
    rng = np.random.default_rng(seed)
    pts = g.points_phys()
    centre = pts.reshape(-1, 3).mean(0)
    disp = np.zeros(pts.shape, np.float32)
    for c in range(3):
        k = rng.uniform(0.5, 1.0, 3) * 2 * np.pi / 120.0  # one period over ~120-240 mm
        disp[..., c] = amplitude * np.sin(((pts - centre) * k).sum(-1) + rng.uniform(0, 2 * np.pi))
    return DisplacementField(g, disp)


@pytest.mark.parametrize("kind", ["translation", "smooth"])
def test_known_deformation_recovered(brain, kind):
    fixed, fixed_lab = brain
    g = fixed.geometry
    if kind == "translation":
        truth = MatrixTransform.translation([6.0, -4.0, 3.0]).to_field(g)  # mm
    else:
        truth = _smooth_field(g, amplitude=4.0)  # up to 4 mm (2 voxels)
    # The moving image is the fixed one seen through the inverse: registering it back must find `truth`.
    inv = truth.invert()
    moving = warp_image(fixed, inv, g)
    moving_lab = warp_image(fixed_lab, inv, g, labels=True)
    res = register(moving, fixed, options=FAST, device="cpu")
    brain_mask = fixed.array > 0.1 * fixed.array.max()
    err_before = np.linalg.norm(truth.disp, axis=-1)[brain_mask].mean()
    err = np.linalg.norm(res.field.disp - truth.disp, axis=-1)[brain_mask].mean()
    assert err < 2.0, f"mean field error {err:.2f} mm is not below one 2 mm voxel (before {err_before:.2f})"
    d_before = np.mean(list(dice(moving_lab.array, fixed_lab.array, labels=[1, 2]).values()))
    d_after = np.mean(list(dice(res.warp_labels(moving_lab).array, fixed_lab.array, labels=[1, 2]).values()))
    assert d_after > d_before + 0.05, (d_before, d_after)
    assert res.fold_fraction < 1e-3


def test_points_both_ways(brain):
    fixed, _ = brain
    g = fixed.geometry
    truth = MatrixTransform.translation([5.0, 0.0, -3.0]).to_field(g)
    res = register(warp_image(fixed, truth.invert(), g), fixed, options=FAST, device="cpu")
    pts = g.points_phys()[20:25, 40:45, 30:35].reshape(-1, 3)
    mapped = res.map_points(pts)
    np.testing.assert_allclose(mapped - pts, np.tile([5.0, 0.0, -3.0], (len(pts), 1)), atol=1.0)
    np.testing.assert_allclose(res.map_points_inverse(mapped), pts, atol=1e-2)


def test_progress_cancel_and_bad_input(brain):
    img, _ = brain
    gen = iter_register(img, img, options=FAST, device="cpu")
    estimate, first = next(gen), next(gen)
    assert estimate.stage == "estimate" and first.stage == "preparing"
    steps = [next(gen) for _ in range(3)]
    assert all(s.loss is not None for s in steps)
    calls = iter([False, False, True])
    with pytest.raises(Cancelled):
        register(img, img, options=FAST, device="cpu", cancel=lambda: next(calls, True))
    flat2d = Image(np.zeros((16, 16), np.float32), Geometry.default((16, 16)), path="flat.png")
    noise2d = Image(np.random.default_rng(0).random((16, 16)).astype(np.float32), Geometry.default((16, 16)))
    with pytest.raises(ImageError, match="3D.*2D|2D.*3D"):
        register(img, noise2d)
    with pytest.raises(ImageError, match="constant"):
        register(noise2d, flat2d)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            register(img, img, device="cuda")
