"""AltO: homography frames, the network at zero offsets, the alternating recipe through the real loop,
the ablation, and the registered method on the pipeline."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_register import coords, register, weights
from napari_register.coords import Geometry
from napari_register.coords import norm_from_px, px_from_norm
from napari_register.data.photos import make_pair
from napari_register.image import Image
from napari_register.methods.alto import AltONet, _ransac, build, corner_homography, corners_px, warp
from napari_register.methods.registry import get_method
from napari_register.training import build_parser
from napari_register.training.loop import train
from napari_register.training.recipes import alto as alto_recipe
from napari_register.transforms import MatrixTransform

torch.set_num_threads(1)
TINY = {"width": 4, "hypotheses": 64, "enc_widths": [4, 4, 8, 8]}


def _random_h(gen: torch.Generator, n: int = 3, side: int = 40, rho: float = 6.0) -> torch.Tensor:
    src = corners_px((side, side))[None].expand(n, 4, 2)
    return coords.fit_homography(src, src + rho * (2 * torch.rand(n, 4, 2, generator=gen, dtype=torch.float64) - 1))


def test_px_norm_round_trip_and_agreement_with_the_photo_source():
    gen = torch.Generator().manual_seed(0)
    h = _random_h(gen)
    for shape in [(40, 40), (30, 50)]:
        torch.testing.assert_close(px_from_norm(norm_from_px(h, shape), shape), h)
        torch.testing.assert_close(px_from_norm(norm_from_px(h[0], shape), shape), h[0])  # unbatched
    # the photo source's truth: H_px (x, y) and the dense norm map must be the same transform
    pair = make_pair(torch.rand(1, 120, 120, generator=gen), gen, size=32, rho=6)
    m = norm_from_px(pair.truth_matrix[None], (32, 32)).float()
    torch.testing.assert_close(coords.matrix_map(m, (32, 32)), pair.truth_map, atol=1e-5, rtol=0)


def test_batched_map_matches_coords_matrix_map_and_dlt_matches_the_photo_source():
    gen = torch.Generator().manual_seed(1)
    h = _random_h(gen)
    m = norm_from_px(h, (24, 36))
    for k in range(3):
        torch.testing.assert_close(coords.matrix_map(m, (24, 36))[k], coords.matrix_map(m[k], (24, 36))[0])
        src = corners_px((40, 40))
        torch.testing.assert_close(coords.fit_homography(src[None], coords_apply(h[k], src)[None])[0],
                                   coords.fit_homography(src, coords_apply(h[k], src)))
        torch.testing.assert_close(coords.fit_homography(src, coords_apply(h[k], src)), h[k])  # recovers H


def coords_apply(h: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(coords.apply_h(h.numpy(), pts.numpy()))


def test_a_known_homography_warps_as_expected():
    img = torch.rand(1, 1, 40, 50, generator=torch.Generator().manual_seed(2))
    # moving x = fixed x + 5, moving y = fixed y + 3 (px): warped[r, c] = moving[r + 3, c + 5]
    h = torch.tensor([[1.0, 0, 5], [0, 1, 3], [0, 0, 1]])
    out = warp(img, norm_from_px(h, (40, 50))[None])
    torch.testing.assert_close(out[0, 0, :37, :45], img[0, 0, 3:, 5:], atol=1e-5, rtol=0)
    # a perspective one: the warped image at a fixed pixel is the moving image where H sends it
    src = corners_px((40, 50))
    hp = coords.fit_homography(src[None], (src + torch.tensor([[2.0, 1], [-3, 2], [1, -2], [2, 3]], dtype=torch.float64))[None])[0]
    out = warp(img.double(), norm_from_px(hp, (40, 50))[None])
    x, y = 20, 17  # fixed px (x = column)
    u, v = coords.apply_h(hp.numpy(), np.array([[x, y]]))[0]
    c0, r0 = int(np.floor(u)), int(np.floor(v))
    a, b = u - c0, v - r0
    p = img[0, 0].double()
    expect = ((1 - a) * (1 - b) * p[r0, c0] + a * (1 - b) * p[r0, c0 + 1] + (1 - a) * b * p[r0 + 1, c0]
              + a * b * p[r0 + 1, c0 + 1])
    torch.testing.assert_close(out[0, 0, y, x], expect)


def _texture(seed: int, side: int = 128) -> torch.Tensor:
    img = coords.gaussian_blur(torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(seed)), 2.0)
    return (img - img.min()) / (img.max() - img.min())


def _mace(h: torch.Tensor, truth: torch.Tensor, side: int) -> float:
    c = corners_px((side, side)).numpy()
    return float(np.linalg.norm(coords.apply_h(h.double().numpy(), c) - coords.apply_h(truth.double().numpy(), c), axis=1).mean())


def test_the_untrained_matcher_finds_a_homography_across_a_modality_change():
    # R at its start (the head adds zero): MIND tokens, soft-argmax, RANSAC, weighted DLT
    net = AltONet().eval()
    img = _texture(0)
    truth = corner_homography(torch.tensor([[[9.0, -6], [-7, 8], [6, 5], [-8, -4]]]), (128, 128))
    moving = warp(img, torch.linalg.inv(norm_from_px(truth, (128, 128))))  # moving(H x) = fixed(x)
    with torch.no_grad():
        for m in (moving, 1 - moving, 0.5 + 0.5 * torch.sin(3 * math.pi * moving)):  # same, inverted, non-monotonic
            assert _mace(net.homography_px(m, img)[0], truth[0], 128) < 1.5
        assert _mace(net.homography_px(img, img)[0], torch.eye(3), 128) < 0.1
        flat = torch.full((1, 1, 128, 128), 0.5)  # nothing to match: the identity, not a guess
        torch.testing.assert_close(net.homography_px(flat, flat)[0], torch.eye(3))
    with pytest.raises(ValueError, match=r"\(B, 1, 128, 128\)"):
        net(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    net.offsets(img, img)  # the corner parameterisation of the paper


def test_ransac_recovers_a_homography_from_matches_with_most_of_them_wrong():
    gen = torch.Generator().manual_seed(4)
    h = _random_h(gen, n=2, side=100, rho=15)
    src = torch.rand(2, 200, 2, generator=gen, dtype=torch.float64) * 100
    dst = torch.from_numpy(np.stack([coords.apply_h(h[k].numpy(), src[k].numpy()) for k in range(2)]))
    wrong = torch.rand(2, 200, generator=gen) < 0.6
    dst = torch.where(wrong[..., None], torch.rand(2, 200, 2, generator=gen, dtype=torch.float64) * 100, dst)
    best = _ransac(src, dst, torch.ones(2, 200, dtype=torch.float64), 2.0, 300)
    for k in range(2):
        assert _mace(best[k], h[k], 100) < 0.5


# ----------------------------------------------------------------------------- training through the loop

def _args(tmp_path, name: str, steps: int = 2, options: str = "{}", size: int = 32):
    options = json.dumps({"size": size, **json.loads(options)})
    return build_parser().parse_args([
        "--method", "alto", "--dim", "2", "--out", str(tmp_path / f"{name}.pt"), "--steps", str(steps),
        "--batch", "2", "--lr", "3e-4", "--save-every", "1", "--threads", "1", "--config", json.dumps(TINY),
        "--recipe-options", options])


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def _spy_module(seen: list):
    """The real recipe, its phases' losses wrapped to record the model's state as each starts."""
    def make(settings, options):
        rec = alto_recipe.recipe(settings, options)
        for phase in rec.phases:
            def wrapped(model, batch, step, _loss=phase.loss, _name=phase.name):
                seen.append((_name, _state(model)))
                return _loss(model, batch, step)
            phase.loss = wrapped
        return rec

    return SimpleNamespace(DIMS=alto_recipe.DIMS, OPTIONS=alto_recipe.OPTIONS, recipe=make)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


def test_each_alternating_phase_changes_only_its_own_parameters(tmp_path):
    seen: list = []
    path = train(_args(tmp_path, "alt"), module=_spy_module(seen))
    assert [n for n, _ in seen] == ["geometry", "representation"] * 2
    final = _state(weights.load(path, "alto", 2, build)[0])
    states = [s for _, s in seen] + [final]
    for (name, before), after in zip(seen, states[1:]):  # weights and BatchNorm statistics alike
        assert _changed(before, after) == ({"reg"} if name == "geometry" else {"enc", "proj"}), name
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["alternate"] is True and card["recipe_options"]["lam"] == 0.005
    assert [p["optimiser"] for p in card["phases"]] == ["R", "EP"]
    log = [json.loads(x) for x in (tmp_path / "alt.run" / "log.jsonl").read_text().splitlines()]
    assert set(log[0]) >= {"geometry/loss", "geometry/mace", "representation/loss"}


def test_no_alternation_ablation_trains_every_part_at_once(tmp_path):
    seen: list = []
    path = train(_args(tmp_path, "joint", steps=1, options='{"alternate": false}'), module=_spy_module(seen))
    assert [n for n, _ in seen] == ["joint"]
    after = _state(weights.load(path, "alto", 2, build)[0])
    assert _changed(seen[0][1], after) == {"reg", "enc", "proj"}
    assert json.loads(path.with_suffix(".json").read_text())["alternate"] is False


def test_geometry_loss_gives_the_encoder_no_gradient():
    settings = SimpleNamespace(dim=2, steps=2, batch=2, lr=3e-4, seed=0, shape=None, config=TINY)
    rec = alto_recipe.recipe(settings, {"size": 32})
    net = rec.build(**rec.config).train()
    batch = next(rec.batches(0))
    loss, logs = rec.phases[0].loss(net, batch, 0)
    loss.backward()
    assert all(p.grad is None for p in [*net.enc.parameters(), *net.proj.parameters()])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.reg.parameters())
    assert net.enc.training  # its mode is restored after the frozen pass


def test_bad_recipe_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="alternate must be true or false"):
        train(_args(tmp_path, "bad", options='{"alternate": "no"}'))
    args = _args(tmp_path, "shape")
    args.shape = [64, 64]
    with pytest.raises(ValueError, match="leave --shape out"):
        train(args)
    args = _args(tmp_path, "config")
    args.config = json.dumps({**TINY, "size": 64})
    with pytest.raises(ValueError, match="recipe-options"):
        train(args)


# ----------------------------------------------------------------------------- the registered method

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alto")
    return train(_args(tmp, "ckpt", steps=1, size=128))  # the method works at the checkpoint's size


def test_a_trained_checkpoint_registers_a_2d_pair_as_a_matrix(checkpoint):
    cls = get_method("alto")
    assert cls.kind == "homography" and cls.dims == (2,)
    method = cls(2, torch.device("cpu"), checkpoint)
    assert method.affine_iterations == 0 and method.working_shape((60, 90), (1.0, 1.0)) == (128, 128)
    gen = np.random.default_rng(0)
    fixed = Image(gen.random((60, 90)).astype(np.float32), Geometry.default((60, 90)))
    moving = Image(gen.random((60, 90)).astype(np.float32), Geometry.default((60, 90)))
    res = register(moving, fixed, method="alto", checkpoint=str(checkpoint), device="cpu", io_steps=0)
    assert isinstance(res.transform.transforms[0], MatrixTransform)
    m = res.output.matrix
    assert m.shape == (3, 3)
    # spacing 1, origin 0, same grids: the physical matrix is the pixel homography on the native grid
    np.testing.assert_allclose(res.transform.as_matrix(), px_from_norm(m.double(), (60, 90)).numpy(), atol=1e-6)


def test_instance_optimisation_fits_the_corners_on_a_copy(checkpoint):
    gen = torch.Generator().manual_seed(3)
    img = coords.gaussian_blur(torch.rand(1, 1, 128, 128, generator=gen), 3.0)
    img = (img - img.min()) / (img.max() - img.min())
    truth = corner_homography(torch.tensor([[[3.0, -2], [-2, 3], [2, 2], [-3, -1]]]), (128, 128))
    moving, fixed = warp(img, torch.linalg.inv(norm_from_px(truth, (128, 128)))), img  # moving(H x) = fixed(x)
    as_image = lambda t: Image(t[0, 0].numpy(), Geometry.default((128, 128)))  # noqa: E731
    method = get_method("alto")(2, torch.device("cpu"), checkpoint)
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    res = register(as_image(moving), as_image(fixed), method=method, io_steps=60)
    corners = corners_px((128, 128)).numpy()
    error = np.linalg.norm(coords.apply_h(res.transform.as_matrix(), corners)
                           - coords.apply_h(truth[0].numpy(), corners), axis=1).mean()
    start = np.linalg.norm(corners - coords.apply_h(truth[0].numpy(), corners), axis=1).mean()
    assert error < 0.5 < 3 < start, (error, start)
    assert all(torch.equal(before[k], v) for k, v in method.net.state_dict().items())  # the copy was tuned


def test_the_method_refuses_3d(checkpoint):
    with pytest.raises(ValueError, match="not 3D"):
        get_method("alto")(3, torch.device("cpu"), checkpoint)
    vol = Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), Geometry.default((8, 8, 8)))
    with pytest.raises(ValueError, match="does not register 3D"):
        register(vol, vol, method="alto", checkpoint=str(checkpoint), device="cpu")


def test_the_homography_is_written_as_3x3_text_and_as_an_itk_transform(checkpoint, tmp_path):
    # ITK has no 2D perspective transform class: the ITK export is the displacement field, which must
    # move every fixed point as the homography does (up to its linear interpolation between pixels)
    import SimpleITK as sitk

    from napari_register.image import write_image
    from napari_register.outputs import PairFiles, register_to_folder

    img = _texture(5, 96)
    truth = corner_homography(torch.tensor([[[4.0, -3], [-3, 4], [3, 3], [-4, -2]]]), (96, 96))
    moving = warp(img, torch.linalg.inv(norm_from_px(truth, (96, 96))))
    geo = Geometry((96, 96), (0.5, 0.5), (3.0, -2.0), np.eye(2))
    for name, t in (("m.nii.gz", moving), ("f.nii.gz", img)):
        write_image(Image(t[0, 0].numpy(), geo), tmp_path / name)
    out = tmp_path / "out"
    register_to_folder(PairFiles(str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz")), out, method="alto",
                       checkpoint=str(checkpoint), io_steps=20, device="cpu")
    h = np.loadtxt(out / "homography.txt")
    assert h.shape == (3, 3) and not np.allclose(h, np.eye(3))
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert field.GetSpacing() == (0.5, 0.5) and field.GetOrigin() == (3.0, -2.0)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    pts = np.array([[10.0, 5.0], [20.3, 30.1], [40.0, 12.5]])  # physical (x, y) inside the fixed grid
    for p in pts:
        np.testing.assert_allclose(tx.TransformPoint(tuple(p)), coords.apply_h(h, p[None])[0], atol=1e-3)


def test_the_corner_fit_can_keep_its_start_when_it_ends_worse():
    from napari_register.instance_opt import iter_corner_fit
    from napari_register.losses import get_similarity

    img = _texture(6, 64)
    truth = norm_from_px(corner_homography(torch.tensor([[[2.0, -1], [-1, 2], [1, 1], [-2, -1]]]), (64, 64)), (64, 64))
    moving = warp(img, torch.linalg.inv(truth))

    def fit(keep: bool) -> torch.Tensor:  # 40 px per step: the fit leaves the truth it starts at
        gen = iter_corner_fit(moving, img, truth[0].float(), 5, get_similarity("mind"), lr=40.0, blur=0.0,
                              keep_better=keep)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value[0]

    assert _mace(px_from_norm(fit(False).double(), (64, 64)), px_from_norm(truth[0], (64, 64)), 64) > 5
    torch.testing.assert_close(fit(True), truth[0].float())
