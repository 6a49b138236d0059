"""Homography first, then deformable: a matrix the moving image goes through before the method
(``prealign``), from Python and from the command line (``--prealign``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_register import register
from napari_register.api import homography_first
from napari_register.cli import main
from napari_register.errors import InputError
from napari_register.coords import Geometry
from napari_register.image import Image, read_image
from napari_register.transforms import MatrixTransform, warp_image

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
NO_MOTION = {"levels": [4], "iterations": [1], "affine_iterations": 0}  # the method adds (almost) nothing


@pytest.fixture(scope="module")
def photo_pair():
    """The HE slide (4x smaller) and a copy of it through a known homography with perspective."""
    full = read_image(SAMPLE / "histology" / "fixed.jpg")
    arr = np.ascontiguousarray(full.luminance()[::4, ::4])
    fixed = Image(arr, Geometry.default(arr.shape))
    h, w = fixed.shape
    c = np.array([w / 2, h / 2])
    H = np.array([[1.05, 0.06, 0.0], [-0.04, 0.97, 0.0], [6e-5, -4e-5, 1.0]])
    H[:2, 2] = c + [7.0, -5.0] - H[:2, :2] @ c  # about the centre, plus a shift
    H = H / (H[2] @ [*c, 1.0])  # the centre keeps its scale
    moving = warp_image(fixed, MatrixTransform(np.linalg.inv(H)), fixed.geometry)  # moving(H x) = fixed(x)
    return moving, fixed, H


def _error(res, fixed) -> float:
    inside = res.warped.array > 0
    return float(np.abs(res.warped.array - fixed.array)[inside].mean())


def test_prealign_homography_is_applied_first_and_included_in_the_result(photo_pair):
    moving, fixed, H = photo_pair
    plain = register(moving, fixed, options=NO_MOTION, device="cpu")
    pre = register(moving, fixed, options=NO_MOTION, device="cpu", prealign=MatrixTransform(H))
    assert _error(pre, fixed) < 0.75 * _error(plain, fixed)
    pts = np.array([[20.0, 30.0], [150.0, 200.0], [200.0, 60.0]])
    # the field holds H (plus the one small step the method took)
    assert np.abs(pre.map_points(pts) - MatrixTransform(H).moving_from_fixed(pts)).max() < 1.5
    assert np.abs(plain.map_points(pts) - MatrixTransform(H).moving_from_fixed(pts)).max() > 5
    assert pre.fold_fraction == 0.0
    assert pre.prealign is not None and plain.prealign is None
    # continuing the run (instance optimisation of its result) stays in the frame it started in
    more = register(moving, fixed, options=NO_MOTION, device="cpu", init=pre)
    assert more.prealign is pre.prealign
    assert np.abs(more.map_points(pts) - MatrixTransform(H).moving_from_fixed(pts)).max() < 1.5


def test_homography_first_takes_a_matrix_result_and_refuses_a_dense_one(photo_pair):
    moving, fixed, _ = photo_pair
    dense = register(moving, fixed, options=NO_MOTION, device="cpu")
    with pytest.raises(InputError, match="dense field, not a matrix"):
        homography_first(dense)
    matrix = MatrixTransform(np.array([[1.0, 0, 3], [0, 1.0, -2], [0, 0, 1]]))
    dense.transform = matrix  # a matrix method's result carries its matrix as the transform
    assert np.allclose(homography_first(dense).matrix, matrix.matrix)
    with pytest.raises(InputError, match="prealign must be a 2D MatrixTransform"):
        register(moving, fixed, options=NO_MOTION, device="cpu", prealign=MatrixTransform(np.eye(4)))


def test_cli_prealign_from_a_matrix_file_recorded_and_protected(tmp_path, capsys):
    h = SAMPLE / "histology"
    pre = tmp_path / "homography.txt"
    MatrixTransform(np.array([[1.0, 0, 8.0], [0, 1.0, -4.0], [0, 0, 1]])).save_txt(pre)
    out = tmp_path / "out"
    args = ["register", str(h / "moving.jpg"), str(h / "fixed.jpg"), "--quiet", "--options",
            json.dumps({"levels": [8], "iterations": [3], "affine_iterations": 0})]
    assert main([*args, "--out", str(out), "--prealign", str(pre)]) == 0
    assert json.loads((out / "metrics.json").read_text())["prealign"] == str(pre.resolve())
    capsys.readouterr()
    # the matrix file is an input: a run into its folder must not overwrite it
    assert main([*args, "--out", str(tmp_path), "--prealign", str(pre)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("1 0 0\n0 1 0\n")
    assert main([*args, "--out", str(tmp_path / "o2"), "--prealign", str(bad)]) == 2
    assert "expected an invertible 3x3 matrix" in capsys.readouterr().err
