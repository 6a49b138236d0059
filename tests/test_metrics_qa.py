"""Metrics (Dice, TRE, MACE, folding, NCC, centroids) and QA images (checkerboard, grid, Jacobian)."""
from __future__ import annotations

import numpy as np
import pytest

from napari_register import metrics, qa, qa_figure


# ----------------------------------------------------------------------------------- metrics

def test_dice_identical_disjoint_and_partial():
    a = np.zeros((10, 10), np.int32)
    a[:5, :5] = 1
    a[5:, 5:] = 2
    assert metrics.dice(a, a) == {1: 1.0, 2: 1.0}

    b = np.zeros_like(a)
    b[:5, 5:] = 1  # label 1 moved to where neither label was
    d = metrics.dice(a, b)
    assert d[1] == 0.0 and d[2] == 0.0

    # label 1: a has 25 voxels, c has rows 0..4 x cols 2..6 = 25, overlap cols 2..4 = 15 -> 30/50
    c = np.zeros_like(a)
    c[:5, 2:7] = 1
    assert metrics.dice(a, c, labels=[1])[1] == pytest.approx(0.6, abs=1e-12)
    # a label absent in both maps is undefined, not perfect
    assert np.isnan(metrics.dice(a, c, labels=[7])[7])
    # float label maps (nearest-neighbour warps) are accepted
    assert metrics.dice(a.astype(np.float32), c.astype(np.float64))[1] == pytest.approx(0.6)


def test_dice_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same grid|share one grid"):
        metrics.dice(np.zeros((3, 3), int), np.zeros((3, 4), int))


def test_dice_channels():
    a = np.zeros((4, 4, 4, 3))
    b = np.zeros((4, 4, 4, 3))
    a[:2, ..., 0] = 1   # 32 voxels
    b[:1, ..., 0] = 1   # 16 voxels, all inside a -> 2*16/48
    a[0, 0, 0, 1] = 1   # channel 1 only in a -> 0
    # channel 2 empty in both -> NaN
    out = metrics.dice_channels(a, b)
    assert out[0] == pytest.approx(2 / 3)
    assert out[1] == 0.0
    assert np.isnan(out[2])


def test_tre_known_points():
    a = np.zeros((4, 3))
    b = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])  # 5, 1, 2, 0
    t = metrics.tre(a, b)
    assert t["mean"] == pytest.approx(2.0)
    assert t["median"] == pytest.approx(1.5)
    assert t["max"] == pytest.approx(5.0)
    assert t["std"] == pytest.approx(np.std([5, 1, 2, 0]))
    # per-axis scale (voxel spacing) multiplies the differences
    assert metrics.tre(a, b, scale=(2, 2, 2))["max"] == pytest.approx(10.0)
    with pytest.raises(ValueError):
        metrics.tre(a, b[:3])


def test_mace_of_a_translation():
    shift = np.array([[1, 0, 3], [0, 1, -4], [0, 0, 1]], dtype=float)
    true = metrics.homography_corners(np.eye(3), (32, 48))
    np.testing.assert_allclose(true, [[0, 0], [47, 0], [47, 31], [0, 31]])
    pred = metrics.homography_corners(shift, (32, 48))
    assert metrics.mace(pred, true) == pytest.approx(5.0)
    assert metrics.mace(np.stack([pred, true]), np.stack([true, true])) == pytest.approx(2.5)


def test_fold_fraction():
    jac = np.array([[1.0, 0.5, 0.0], [-1.0, 2.0, 1.0]])
    assert metrics.fold_fraction(jac) == pytest.approx(2 / 6)
    mask = np.array([[True, True, False], [False, True, True]])
    assert metrics.fold_fraction(jac, mask) == 0.0
    assert np.isnan(metrics.fold_fraction(jac, np.zeros_like(mask)))


def test_ncc_and_lncc():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 20))
    assert metrics.ncc(a, 3 * a + 2) == pytest.approx(1.0)
    assert metrics.ncc(a, -a) == pytest.approx(-1.0)
    assert np.isnan(metrics.ncc(a, np.ones_like(a)))
    assert metrics.lncc(a, 2 * a + 1, window=5) == pytest.approx(1.0, abs=1e-3)
    assert abs(metrics.lncc(a, rng.normal(size=a.shape), window=5)) < 0.2


def test_centroid_distance_uses_xyz_spacing_on_zyx_arrays():
    a = np.zeros((5, 6, 7), bool)
    b = np.zeros_like(a)
    a[1, 2, 3] = True
    b[3, 2, 4] = True  # 2 voxels along z, 1 along x
    # spacing (x, y, z) = (0.5, 1, 2): dz = 4 mm, dx = 0.5 mm
    assert metrics.centroid_distance(a, b, (0.5, 1.0, 2.0)) == pytest.approx(np.hypot(4.0, 0.5))
    assert np.isnan(metrics.centroid_distance(a, np.zeros_like(a), (1, 1, 1)))


# ----------------------------------------------------------------------------------------- qa

def test_checkerboard_alternates_sources():
    # opposite ramps, so every pixel tells which source it came from
    a = np.tile(np.linspace(0, 1, 8), (8, 1))
    b = 1 - a
    cb = qa.checkerboard(a, b, tiles=4)
    na, nb = qa.normalize(a), qa.normalize(b)
    tile = (np.arange(8)[:, None] // 2 + np.arange(8)[None, :] // 2) % 2
    np.testing.assert_array_equal(cb, np.where(tile == 0, na, nb))
    assert cb[0, 0] == na[0, 0] and cb[0, 2] == nb[0, 2] and cb[2, 2] == na[2, 2]


def test_checkerboard_3d_and_rgb():
    a = np.zeros((4, 4, 4)) + np.arange(4)
    cb = qa.checkerboard(a, a.max() - a, tiles=2)
    assert cb.shape == (4, 4, 4) and cb.dtype == np.float32
    # tile (0,0,0) from a, tile (1,0,0) from b
    assert cb[0, 0, 1] == qa.normalize(a)[0, 0, 1]
    assert cb[2, 0, 1] == qa.normalize(a.max() - a)[2, 0, 1]
    rgb = np.random.default_rng(1).random((6, 6, 3))
    cb = qa.checkerboard(rgb, 1 - rgb, tiles=2, rgb=True)
    np.testing.assert_array_equal(cb[0, 0], qa.normalize(rgb)[0, 0])  # whole pixel from one source
    np.testing.assert_array_equal(cb[0, 3], qa.normalize(1 - rgb)[0, 3])


def test_difference_and_blend():
    a = np.linspace(0, 1, 101).reshape(1, -1)
    np.testing.assert_allclose(qa.difference(a, a), 0)
    np.testing.assert_allclose(qa.blend(a, 1 - a, 0.5), 0.5, atol=1e-6)
    np.testing.assert_allclose(qa.blend(a, 1 - a, 0.0), qa.normalize(a))
    with pytest.raises(ValueError):
        qa.blend(a, a, 1.5)


def test_grid_image_zero_and_shifted_displacement():
    disp = np.zeros((20, 30, 2))
    g = qa.grid_image(disp, spacing=8)
    rows, cols = np.arange(20)[:, None], np.arange(30)[None, :]
    expected = (rows % 8 == 0) | (cols % 8 == 0)
    np.testing.assert_array_equal(g, expected.astype(np.float32))
    assert g.dtype == np.float32

    # moving = x + disp: a +3 shift along columns puts the lines where col + 3 is a multiple of 8
    disp[..., 1] = 3
    g = qa.grid_image(disp, spacing=8)
    expected = (rows % 8 == 0) | ((cols + 3) % 8 == 0)
    np.testing.assert_array_equal(g, expected.astype(np.float32))


def test_grid_image_stays_unbroken_under_stretch():
    # moving col = 2.5 * fixed col: neighbouring voxels jump over multiples of 8 (2.5 * 3 = 7.5,
    # 2.5 * 4 = 10); the nearer voxel still gets the line, so each line of the grid appears.
    cols = np.arange(40, dtype=float)
    disp = np.zeros((5, 40, 2))
    disp[..., 1] = 1.5 * cols
    line_cols = np.flatnonzero(qa.grid_image(disp, spacing=8, axes=[1])[0])
    nearest = [int(np.argmin(np.abs(2.5 * cols - m))) for m in range(0, 98, 8)]
    assert sorted(set(nearest)) == list(line_cols)


def test_grid_3d_slices():
    disp = np.zeros((9, 10, 11, 3))
    g = qa.grid_image(disp, spacing=4)
    # any-axis rule: a slice on a plane of its own axis is filled, others show in-plane lines
    assert g[4].all()
    np.testing.assert_array_equal(g[1], ((np.arange(10)[:, None] % 4 == 0) | (np.arange(11) % 4 == 0)))
    s = qa.grid_slice(disp, axis=0, index=4, spacing=4)
    np.testing.assert_array_equal(s, g[1])  # in-plane lines only, never filled
    assert qa.grid_slice(disp, axis=2, index=5, spacing=4).shape == (9, 10)


def test_jacobian_rgb_colours():
    rgb = qa.jacobian_rgb(np.array([1.0, 0.0, -0.5, 2.0, 5.0, 0.5, np.nan]))
    assert rgb.dtype == np.uint8 and rgb.shape == (7, 3)
    assert rgb[0].min() >= 245  # white-ish at det = 1
    fold = np.round(np.asarray(qa.JACOBIAN_COLORS["fold"]) * 255)
    np.testing.assert_array_equal(rgb[1], fold)
    np.testing.assert_array_equal(rgb[2], fold)
    assert rgb[3][0] > rgb[3][2] and (rgb[3] == rgb[4]).all()  # red at vmax and clipped above
    assert rgb[5][2] > rgb[5][0]  # shrinking is blue
    assert not (rgb[6] == fold).all()


@pytest.mark.parametrize("vmin, vmax, scale", [(0.0, 2.0, "linear"), (0.25, 4.0, "log")])
def test_jacobian_colormap_matches_rgb(vmin, vmax, scale):
    cm = qa.jacobian_colormap(vmin, vmax, scale=scale)
    controls, colors = cm["controls"], cm["colors"]
    lo, hi = cm["contrast_limits"]
    assert controls[0] == 0 and controls[-1] == pytest.approx(1) and np.all(np.diff(controls) > 0)
    # napari interpolates linearly in det: the log scale's controls must follow it closely
    for value in (-1.0, 0.0, 0.1, 0.3, 0.5, 0.8, 1.0, 1.7, 3.0, 5.0):
        pos = np.clip((value - lo) / (hi - lo), 0, 1)
        rgb = [np.interp(pos, controls, colors[:, c]) for c in range(3)]
        expected = qa.jacobian_rgb(np.array(value), vmin, vmax, scale=scale)
        np.testing.assert_allclose(np.asarray(rgb) * 255, expected, atol=1.0)


def test_jacobian_log_scale_is_centred_and_symmetric():
    det = np.array([1.0, 2.0, 0.5, 2 ** 0.5, 2 ** -0.5, 8.0, 1 / 8, 0.0, -2.0, np.nan])
    t = qa.jacobian_position(det, 0.5, 2.0, scale="log")
    np.testing.assert_allclose(t[:7], [0, 1, -1, 0.5, -0.5, 1, -1])  # doubling and halving equally far
    rgb = qa.jacobian_rgb(det, 0.5, 2.0, scale="log").astype(int)
    c = {k: np.round(np.asarray(v) * 255) for k, v in qa.JACOBIAN_COLORS.items()}
    np.testing.assert_array_equal(rgb[0], c["keep"])  # det = 1: white
    np.testing.assert_array_equal(rgb[1], c["grow"])
    np.testing.assert_array_equal(rgb[2], c["shrink"])
    # sqrt(2) and 1/sqrt(2) lie halfway between white and their end colour
    np.testing.assert_allclose(rgb[3], (c["keep"] + c["grow"]) / 2, atol=1)
    np.testing.assert_allclose(rgb[4], (c["keep"] + c["shrink"]) / 2, atol=1)
    np.testing.assert_array_equal(rgb[7], c["fold"])
    np.testing.assert_array_equal(rgb[8], c["fold"])
    assert not (rgb[9] == c["fold"]).all()
    # the default stays the linear 0 .. 2 scale the napari layers use
    np.testing.assert_array_equal(qa.jacobian_rgb(det[:3]), qa.jacobian_rgb(det[:3], 0.0, 2.0, "linear"))
    assert qa.jacobian_rgb(np.array(0.5))[2] != qa.jacobian_rgb(np.array(0.5), 0.5, 2.0, "log")[2]
    with pytest.raises(ValueError, match="vmin"):
        qa.jacobian_rgb(det, 0.0, 2.0, scale="log")


def test_jacobian_log2_range_robust_symmetric_and_bounded():
    from napari_register.qa_figure import jacobian_log2_range

    rng = np.random.default_rng(0)
    assert jacobian_log2_range(np.exp(rng.normal(0, 0.05, 5000))) == 1.0  # gentle: still 0.5 .. 2
    wide = 2.0 ** rng.uniform(-1.7, 1.7, 5000)  # 95 % of |log2| below ~1.6 -> 2 ** +-2
    assert jacobian_log2_range(wide) == 2.0
    assert jacobian_log2_range(1 / wide) == 2.0  # shrinking counts as much as growing
    assert jacobian_log2_range(2.0 ** rng.uniform(-9, 9, 5000)) == 3.0  # capped at 1/8 .. 8
    assert jacobian_log2_range(-np.ones(10)) == 1.0  # all folded: nothing to measure


def _figure(fixed, warped, jac=None, disp=None, **kw):
    from napari_register.qa_figure import build_qa_figure

    return build_qa_figure(fixed, warped, disp, jac, **kw)


def _panels(fig, label):
    return [ax for ax in fig.axes if ax.get_label() == label]


def test_qa_figure_before_and_after_panels():
    from napari_register.qa_figure import overlay

    fixed = np.zeros((24, 24))
    fixed[6:14, 6:14] = 1.0
    before = np.roll(fixed, 6, axis=1)  # misaligned before, aligned after
    fig = _figure(fixed, fixed, np.ones((24, 24)), np.zeros((24, 24, 2)), moving_before=before)
    assert [ax.get_label() for ax in fig.axes[:4]] == ["before", "after", "grid", "jacobian"]
    shown_before = _panels(fig, "before")[0].get_images()[0].get_array()
    shown_after = _panels(fig, "after")[0].get_images()[0].get_array()
    np.testing.assert_array_equal(shown_before, overlay(fixed, before))
    assert tuple(shown_before[10, 7]) == (1, 0, 1) and tuple(shown_before[10, 15]) == (0, 1, 0)  # magenta / green
    np.testing.assert_array_equal(shown_after[..., 0], shown_after[..., 1])  # aligned: grey only
    assert "before" in _panels(fig, "before")[0].get_title() and "after" in _panels(fig, "after")[0].get_title()
    # without the moving image as it was, no before column
    assert [ax.get_label() for ax in _figure(fixed, fixed).axes] == ["after", "grid", "jacobian"]
    with pytest.raises(ValueError, match="moving_before"):
        _figure(fixed, fixed, moving_before=np.zeros((3, 3)))


def test_qa_figure_states_the_whole_volume_fold_fraction_once():
    jac = np.ones((10, 12, 16))
    jac[5, 4:7, 5:8] = -0.5  # 9 folds, all in the middle axial slice: 0.47 % of the volume, 4.7 % of the slice
    fig = _figure(np.random.default_rng(0).random(jac.shape), np.ones(jac.shape), jac)
    suptitle = fig.get_suptitle()
    assert "folds (det J \u2264 0): 9 voxels = 0.47 % of the volume" in suptitle
    assert f"{100 * metrics.fold_fraction(jac):.2g} %" in suptitle
    texts = [t.get_text() for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    assert not any("%" in t for t in texts)  # no second percentage in the panels
    axial, coronal, sagittal = _panels(fig, "jacobian")
    assert axial.get_xlabel() == "this slice: 9 fold voxels (circled)"
    assert coronal.get_xlabel() == "this slice: 3 fold voxels (circled)"  # y = 6 meets one row of them
    assert sagittal.get_xlabel() == ""  # x = 8: none there
    assert "no folds" in _figure(np.ones((8, 8)), np.ones((8, 8)), np.ones((8, 8))).get_suptitle()


def test_qa_figure_draws_large_photos_at_panel_size_in_voxel_coordinates():
    fixed = np.random.default_rng(0).random((500, 800))
    jac = np.ones(fixed.shape)
    jac[499, 799] = -1.0  # one fold in the last voxel, which no 2 x 2 block holds
    fig = _figure(fixed, fixed, jac, np.zeros((500, 800, 2)))
    after, jacobian = _panels(fig, "after")[0], _panels(fig, "jacobian")[0]
    image = after.get_images()[0]
    assert image.get_array().shape == (250, 400, 3)  # 2 x 2 block means: the panel has ~360 pixels
    assert tuple(image.get_extent()) == (-0.5, 799.5, 499.5, -0.5)  # still in voxel coordinates
    np.testing.assert_array_equal(jacobian.collections[0].get_offsets(), [[799, 499]])  # marked where it is
    assert jacobian.get_xlabel() == "this slice: 1 fold voxel (circled)"
    assert "folds (det J \u2264 0): 1 voxel = 0.00025 % of the volume" in fig.get_suptitle()


def test_qa_figure_colour_bar_is_log_centred_at_one():
    jac = np.exp(np.random.default_rng(0).normal(0, 0.05, (16, 16)))
    fig = _figure(np.ones((16, 16)), np.ones((16, 16)), jac)
    bar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0.5", "1", "2"]  # gentle warp: 0.5 .. 2
    assert list(bar.get_yticks()) == [-1.0, 0.0, 1.0]  # log2 axis: 0.5 and 2 equally far from 1
    # the bar's colours: white at det 1, the scale's ends, green below it (folds)
    solids = [m for m in bar.collections if type(m).__name__ == "QuadMesh"][0]
    c = qa.JACOBIAN_COLORS
    np.testing.assert_allclose(solids.cmap(solids.norm(0.0))[:3], c["keep"], atol=0.02)
    np.testing.assert_allclose(solids.cmap(solids.norm(1.0))[:3], c["grow"], atol=0.01)
    np.testing.assert_allclose(solids.cmap(solids.norm(-1.0))[:3], c["shrink"], atol=0.01)
    np.testing.assert_allclose(solids.cmap.get_under()[:3], c["fold"])
    shown = _panels(fig, "jacobian")[0].get_images()[0].get_array()
    np.testing.assert_array_equal(shown, qa.jacobian_rgb(jac, 0.5, 2.0, scale="log"))


def test_qa_title_says_dice_and_tre_before_and_after():
    from napari_register.qa_figure import qa_title

    m = {"method": "optimize", "seconds": 12.34, "dice_mean_before": 0.639, "dice_mean": 0.675,
         "tre_before": 5.1, "tre_after": 2.25}
    title = qa_title(m)
    assert title.startswith("optimize, 12.3 s")
    assert "Dice 0.639 \u2192 0.675" in title and "TRE 5.10 \u2192 2.25 mm" in title
    assert "TRE 5.10 \u2192 2.25 px" in qa_title(m, unit="px")
    assert "TRE" not in qa_title({"method": "optimize", "seconds": 1.0, "dice_mean": 0.5})
    fig = _figure(np.ones((8, 8)), np.ones((8, 8)), np.ones((8, 8)), title=title)
    assert fig.get_suptitle().splitlines()[0] == title


def test_qa_figure_writes_png_2d_and_3d(tmp_path):
    rng = np.random.default_rng(0)
    fixed2 = rng.random((32, 40))
    disp2 = np.zeros((32, 40, 2))
    disp2[..., 0] = 2 * np.sin(np.arange(40) / 6)
    p2 = qa_figure.qa_figure(fixed2, fixed2[::-1], disp2, np.ones((32, 40)), tmp_path / "qa2.png", title="2D",
                      moving_before=fixed2[:, ::-1])
    fixed3 = rng.random((12, 16, 20))
    jac3 = np.ones((12, 16, 20))
    jac3[0, 0, 0] = -1
    p3 = qa_figure.qa_figure(fixed3, fixed3, np.zeros((12, 16, 20, 3)), jac3, tmp_path / "sub" / "qa3.png",
                      spacing_xyz=(1.0, 1.0, 3.0), moving_before=fixed3[::-1])
    p_none = qa_figure.qa_figure(fixed2, fixed2, None, None, tmp_path / "none.png")
    for p in (p2, p3, p_none):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="jac"):
        qa_figure.qa_figure(fixed2, fixed2, None, np.ones((3, 3)), tmp_path / "bad.png")
