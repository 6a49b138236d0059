"""ART: the exact identity, the homography fit, the losses, training through the shared loop, and
the registered method end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_register import coords, register, weights
from napari_register.coords import Geometry
from napari_register.image import Image
from napari_register.methods.art import ARTNet, attention_loss, build, fit_homography, homography_loss, point_loss
from napari_register.methods.registry import get_method, list_methods
from napari_register.training import build_parser
from napari_register.training.loop import train

torch.set_num_threads(1)
TINY = {"widths": [4, 8, 8], "attention_dim": 8, "attention_out": 4, "hidden": 8}


def _homography(shift: float = 0.05) -> torch.Tensor:
    return torch.tensor([[1.02, 0.03, shift], [-0.02, 0.97, -0.03], [0.05, -0.04, 1.0]])


@pytest.mark.parametrize("cross_attention", [True, False])
def test_identical_inputs_give_the_identity_fields_from_the_first_step(cross_attention):
    torch.manual_seed(0)
    net = ARTNet(size=48, cross_attention=cross_attention, **TINY)
    for p in net.parameters():  # any weights, not only the zero-initialised update heads
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 1, 48, 48)
    for d in net(x, x, fields=True):
        torch.testing.assert_close(d[:, :2], torch.ones_like(d[:, :2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(d[:, 2:], torch.zeros_like(d[:, 2:]), atol=1e-5, rtol=0)
    y = torch.rand(2, 1, 48, 48)
    assert (net(x, y, fields=True)[-1][:, 2:]).abs().max() > 1e-3  # and different inputs do move it


def test_steps_double_the_resolution_and_sizes_are_checked():
    net = ARTNet(size=96, **{**TINY, "widths": [4, 8, 8, 8]})
    assert [m.shape[-1] for m in net(torch.rand(1, 1, 96, 96), torch.rand(1, 1, 96, 96))] == [24, 48, 96]
    with pytest.raises(ValueError, match=r"12 \* 2\^K"):
        ARTNet(size=100)
    with pytest.raises(ValueError, match="2D"):
        ARTNet(dim=3)


def test_the_fitted_homography_recovers_a_homography_map_and_its_loss_is_zero():
    m = _homography()
    phi = coords.matrix_map(m[None], (40, 40))
    torch.testing.assert_close(fit_homography(phi)[0], m, atol=1e-4, rtol=1e-4)
    assert float(homography_loss(phi)) < 1e-3
    bent = phi + 0.01 * torch.sin(6 * coords.identity_map((40, 40)))
    assert float(homography_loss(bent)) > 0.05


def test_point_loss_is_in_pixels_and_zero_at_the_truth():
    truth = coords.matrix_map(_homography()[None], (32, 32))
    assert float(point_loss(truth, truth, 50)) == pytest.approx(0.0, abs=1e-8)
    shifted = truth + torch.tensor([2.0 / 31, 0.0]).view(1, 2, 1, 1)  # two pixels along rows
    assert float(point_loss(shifted, truth, 50)) == pytest.approx(4.0, rel=1e-4)
    coarse = coords.resize_map(truth, (8, 8))  # a coarser map is compared at the same image points
    assert float(point_loss(coarse, truth, 50)) < 1e-3


def test_attention_loss_is_zero_on_the_true_cells_and_log_n_when_uniform():
    n = 6
    ident = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, n, n)
    truth = coords.identity_map((24, 24))  # a finer truth grid, resampled to the attention's
    eye = torch.eye(n * n)[None]
    assert float(attention_loss(eye.clamp_min(1e-12), ident, truth)) == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full((1, n * n, n * n), 1.0 / (n * n))
    assert float(attention_loss(uniform, ident, truth)) == pytest.approx(np.log(n * n), rel=1e-5)
    # content one cell down: each fixed token's true cell is the next row's; the tokens whose truth
    # falls off the grid (the last row) do not count
    down = truth + torch.tensor([1.0 / (n - 1), 0.0]).view(1, 2, 1, 1)
    shifted = torch.roll(eye, n, dims=2).clamp_min(1e-12)
    assert float(attention_loss(shifted, ident, down)) == pytest.approx(0.0, abs=1e-4)
    assert float(attention_loss(eye.clamp_min(1e-12), ident, down)) > 15  # -log of the 1e-8 floor
    # the fields the moving image was warped with pull the target back: warped by the same shift,
    # the content is found where the fixed pixel is
    moved = ident.clone()
    moved[:, 2] = 2.0 / (n - 1)  # D_A, centred units: one cell down
    assert float(attention_loss(eye.clamp_min(1e-12), moved, down)) == pytest.approx(0.0, abs=1e-4)


def _train(tmp_path, steps=2, options='{"pretrain": 1}'):
    pytest.importorskip("skimage", reason="the photo pair source reads scikit-image's bundled photos")
    args = build_parser().parse_args([
        "--method", "art", "--dim", "2", "--out", str(tmp_path / "art.pt"), "--steps", str(steps), "--batch", "2",
        "--shape", "48", "48", "--threads", "1", "--save-every", str(steps), "--lr", "1e-3",
        "--config", json.dumps(TINY), "--recipe-options", options])
    return train(args)


def test_trained_by_the_loop_and_registered_end_to_end(tmp_path):
    path = _train(tmp_path)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["method"] == "art" and card["steps"] == 2 and card["data"]["split"] == "train"
    assert {"px2_step1", "px2_step2", "homography", "att_step1", "att_step2"} <= set(card["final_losses"])
    log = [json.loads(line) for line in (tmp_path / "art.run" / "log.jsonl").read_text().splitlines()]
    assert "px2_step1" not in log[0] and "att_step1" in log[0]  # the attention's pre-training came first
    assert not set(card["data"]["photos"]) & {"astronaut", "coffee", "chelsea", "rocket", "camera", "brick"}
    assert "art" in list_methods(2) and "art" not in list_methods(3)
    net, _ = weights.load(path, "art", 2, build)
    assert net.size == 48
    g = Geometry((60, 50), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    yy, xx = np.mgrid[:60, :50]
    fixed = Image(np.exp(-((yy - 30) ** 2 + (xx - 25) ** 2) / 90.0).astype(np.float32), g)
    moving = Image(np.exp(-((yy - 32) ** 2 + (xx - 24) ** 2) / 90.0).astype(np.float32), g)
    result = register(moving, fixed, method="art", checkpoint=str(path), io_steps=2, options={"fit_steps": 0})
    assert result.warped.shape == (60, 50) and result.homography is not None
    assert result.homography.matrix.shape == (3, 3) and np.isfinite(result.homography.matrix).all()
    assert np.isfinite(result.field.disp).all()
    assert result.transform.as_matrix() is None  # the network's result is dense
    # the homography fit (on by default): the result becomes the homography refined from the fitted one
    fitted = register(moving, fixed, method="art", checkpoint=str(path), options={"fit_blur": 2.0})
    np.testing.assert_allclose(fitted.transform.as_matrix(), fitted.homography.as_matrix(), atol=1e-6)
    # the blob's centre (x 25, y 30) is at (24, 32) in the moving image
    assert np.abs(fitted.map_points(np.array([[25.0, 30.0]])) - [24.0, 32.0]).max() < 0.5
    with pytest.raises(ValueError, match="fit_steps must be >= 0"):
        get_method("art")(2, torch.device("cpu"), str(path), fit_steps=-1)
    with pytest.raises(ValueError, match="steps must be in 1..2"):
        get_method("art")(2, torch.device("cpu"), str(path), steps=3)


def test_the_cross_attention_ablation_trains_too(tmp_path):
    pytest.importorskip("skimage", reason="the photo pair source reads scikit-image's bundled photos")
    args = build_parser().parse_args([
        "--method", "art", "--dim", "2", "--out", str(tmp_path / "plain.pt"), "--steps", "1", "--batch", "2",
        "--shape", "48", "48", "--threads", "1", "--config", json.dumps({**TINY, "cross_attention": False})])
    net, _ = weights.load(train(args), "art", 2, build)
    assert net.attention is None
