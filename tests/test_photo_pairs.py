"""Photo pairs with a known homography (napari_register.data.photos) and the photo benchmark on it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_register import coords
from napari_register.data import HOLDOUT
from napari_register.data.photos import PhotoPairs, make_pair, photo_names
from napari_register.data.synthmorph import smooth_noise

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
SKIMAGE = "the photo splits read scikit-image's bundled photos (the test extra installs it)"


def _texture(seed: int = 0) -> torch.Tensor:
    """A (1, 300, 400) smooth random photo: detail at several scales, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = sum(smooth_noise((300, 400), 1, c, g)[0] / c ** 0.3 for c in (8, 24, 60))
    return (x - x.min()) / (x.max() - x.min())


def _px(truth_map: torch.Tensor, rows, cols) -> np.ndarray:
    """(x, y) moving px that the truth map gives at the (sub-pixel) fixed points (rows, cols)."""
    n = truth_map.shape[-1] - 1
    return np.stack([ndimage.map_coordinates(truth_map[0, c].double().numpy() * n, [rows, cols], order=1)
                     for c in (1, 0)], -1)


def test_truth_matrix_and_map_carry_the_fixed_image_onto_the_moving_one():
    p = make_pair(_texture(), torch.Generator().manual_seed(1))
    inside = ((p.truth_map >= 0) & (p.truth_map <= 1)).all(1)
    warped = coords.sample(p.moving, p.truth_map)
    assert float((warped - p.fixed).abs()[:, 0][inside].mean()) < 0.01
    rows, cols = np.mgrid[0:128:9, 0:128:11].reshape(2, -1)
    pts = np.c_[cols, rows, np.ones(len(rows))] @ p.truth_matrix.numpy().T
    assert np.abs(pts[:, :2] / pts[:, 2:] - _px(p.truth_map, rows, cols)).max() < 0.05
    moved = coords.apply_h(p.truth_matrix.numpy(), p.corners.numpy()) - p.corners.numpy()
    assert 2 < np.abs(moved).max() <= 32 + 1e-6  # each corner coordinate moves by up to rho


def test_the_elastic_truth_map_sends_landmarks_to_their_place():
    """Gaussian blobs in the photo: each fixed blob's centroid, mapped by the truth map (homography
    and elastic part), lands on the same blob's centroid in the moving image."""
    yy, xx = np.mgrid[-35:35, -35:35]
    photo = np.tile(np.exp(-(yy ** 2 + xx ** 2) / (2 * 5.0 ** 2)), (9, 12)).astype(np.float32)  # 630 x 840
    p = make_pair(torch.from_numpy(photo)[None], torch.Generator().manual_seed(2), elastic=3.0)
    fixed, moving = p.fixed[0, 0].numpy(), p.moving[0, 0].numpy()
    lab, n = ndimage.label(fixed > 0.05)
    checked = 0
    for i in range(1, n + 1):
        rr, cc = np.nonzero(lab == i)
        if rr.min() == 0 or cc.min() == 0 or rr.max() == 127 or cc.max() == 127:
            continue  # cut by the border: its centroid is not the blob's
        r, c = ndimage.center_of_mass(fixed * (lab == i))
        x, y = _px(p.truth_map, [r], [c])[0]
        mlab = ndimage.label(moving > 0.05)[0]
        j = mlab[int(round(y)), int(round(x))] if 0 <= y < 127 and 0 <= x < 127 else 0
        mr, mc = np.nonzero(mlab == j)
        if j == 0 or mr.min() == 0 or mc.min() == 0 or mr.max() == 127 or mc.max() == 127:
            continue
        my, mx = ndimage.center_of_mass(moving * (mlab == j))
        assert np.hypot(mx - x, my - y) < 0.5
        checked += 1
    assert checked >= 3
    # and the elastic part is there: the map is not the homography alone
    rows, cols = np.mgrid[0:128:16, 0:128:16].reshape(2, -1)
    pts = np.c_[cols, rows, np.ones(len(rows))] @ p.truth_matrix.numpy().T
    assert np.abs(pts[:, :2] / pts[:, 2:] - _px(p.truth_map, rows, cols)).max() > 0.3


def test_seeded_pairs_repeat_exactly_and_other_seeds_differ():
    kw = dict(elastic=2.0, photometric=1.0, modality=1.0)
    a, b, c = (make_pair(_texture(), torch.Generator().manual_seed(s), **kw) for s in (5, 5, 6))
    for k in ("moving", "fixed", "truth_matrix", "truth_map"):
        assert torch.equal(getattr(a, k), getattr(b, k))
        assert not torch.equal(getattr(a, k), getattr(c, k))


def test_batches_have_the_documented_shapes_and_ranges_and_repeat():
    pytest.importorskip("skimage", reason=SKIMAGE)
    src = PhotoPairs(batch=3, seed=4, scale=(0.9, 1.1), photometric=0.5, modality=0.5)
    batch = next(iter(src))
    shapes = {"moving": (3, 1, 128, 128), "fixed": (3, 1, 128, 128), "truth_matrix": (3, 3, 3),
              "truth_map": (3, 2, 128, 128), "corners": (3, 4, 2)}
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert all(v.dtype == torch.float32 for v in batch.values())
    for k in ("moving", "fixed"):
        assert 0 <= float(batch[k].min()) and float(batch[k].max()) <= 1 and float(batch[k].std()) > 0.03
    again = next(iter(PhotoPairs(batch=3, seed=4, scale=(0.9, 1.1), photometric=0.5, modality=0.5)))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    card = src.describe()
    assert card["photos"] == photo_names("train") and card["seed"] == 4


def test_training_photos_never_include_the_benchmark():
    pytest.importorskip("skimage", reason=SKIMAGE)
    train, bench = photo_names("train"), photo_names("benchmark")
    assert train and bench and not set(train) & set(bench)
    assert not [n for n in train if n in HOLDOUT.photos or HOLDOUT.excludes(n)]
    with pytest.raises(ValueError):
        photo_names("test")


def test_benchmark_cases_repeat_and_their_truth_matches_their_images():
    pytest.importorskip("skimage", reason=SKIMAGE)
    from benchmarks import photos

    a, b = photos.cases("clean", n=2), photos.cases("clean", n=2)
    assert all(np.array_equal(x.moving, y.moving) and np.array_equal(x.truth, y.truth) for x, y in zip(a, b))
    pc = a[0]
    assert pc.fixed.shape == pc.moving.shape == (photos.SIZE, photos.SIZE) and pc.fixed.dtype == np.float32
    ys, xs = np.mgrid[32:160:5, 32:160:5].reshape(2, -1)
    pts = np.c_[xs, ys, np.ones(xs.size)] @ pc.truth.T
    moved = ndimage.map_coordinates(pc.moving, [pts[:, 1] / pts[:, 2], pts[:, 0] / pts[:, 2]], order=1)
    assert np.abs(moved - pc.fixed[ys, xs]).mean() < 0.02
    assert 5 < photos.mace(lambda p: p, pc.truth) < 2 * photos.RHO
