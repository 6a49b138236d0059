"""CARL: equivariance of coordinate attention, map composition of TwoStep/Down, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from napari_register import coords, weights
from napari_register.instance_opt import iter_optimise
from napari_register.methods.blocks import ConvEncoder, CoordAttention, Down, Symmetrised, TwoStep
from napari_register.methods.carl import (BRAIN_SETTINGS, CARL, IO_EPS, IO_LAM, IO_TOKENS, LNCC_WINDOW, PASSES,
                                           CARLNet, build, io_shape_for, working_shape_for)
from napari_register.objectives import symmetric_loss

torch.set_num_threads(1)


class FixedMap(torch.nn.Module):
    """A 'network' returning ``fn(identity)`` on the fixed grid; records the images it was given."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, moving, fixed):
        self.seen.append((moving, fixed))
        return self.fn(coords.identity_map(tuple(fixed.shape[2:]), dtype=fixed.dtype))


def _blob_image(n: int, dim: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    """Random texture inside ``[lo, hi)^dim``, zeros elsewhere (so shifts keep all content)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 1, *[n] * dim, dtype=torch.float64)
    img[(..., *[slice(lo, hi)] * dim)] = torch.rand(*[hi - lo] * dim, generator=g, dtype=torch.float64)
    return img


def _sharp_xi(dim: int) -> CoordAttention:
    # A trained Xi has large, discriminative features; random ones scaled up behave alike: each
    # fixed voxel attends (almost) only to its match, so the background tokens carry no weight.
    torch.manual_seed(0)
    xi = CoordAttention(ConvEncoder(dim, 1, 8, (1, 2, 1), 16), scale=100.0).double()
    return xi


@pytest.mark.parametrize("dim", [2, 3])
def test_coordinate_attention_equivariant_to_moving_translation(dim):
    n, lo, hi = 20, 7, 13
    xi = _sharp_xi(dim)
    img = _blob_image(n, dim, lo, hi, seed=1)
    shift = (2, -1, 1)[:dim]
    with torch.no_grad():
        phi = xi(img, img)
        phi_shifted = xi(torch.roll(img, shift, dims=tuple(range(2, 2 + dim))), img)
    expected = phi + torch.tensor(shift, dtype=phi.dtype).view(1, dim, *[1] * dim) / (n - 1)
    inside = (..., *[slice(lo, hi)] * dim)
    err_vox = (phi_shifted - expected)[inside].abs().max().item() * (n - 1)
    assert err_vox < 1e-4, f"moving shifted by {shift}: the map moved by the wrong amount ({err_vox} voxels)"
    # ... and not trivially: with cosine attention a voxel of identical images mostly finds itself
    ident = coords.identity_map((n,) * dim, dtype=phi.dtype)
    assert (phi - ident)[inside].abs().median().item() * (n - 1) < 0.5


@pytest.mark.parametrize("dim", [2, 3])
def test_coordinate_attention_equivariant_to_fixed_translation(dim):
    n, lo, hi = 20, 7, 13
    xi = _sharp_xi(dim)
    fixed = _blob_image(n, dim, lo, hi, seed=2)
    moving = _blob_image(n, dim, lo, hi, seed=3)  # an unrelated image: the property holds regardless
    shift = (-2, 3, 1)[:dim]
    axes = tuple(range(2, 2 + dim))
    with torch.no_grad():
        phi = xi(moving, fixed)
        phi_shifted = xi(moving, torch.roll(fixed, shift, dims=axes))
    # the fixed voxel x + t now plays the role x played: phi'(x + t) = phi(x), exactly, where both
    # grids see the same padded neighbourhood (here: everywhere the roll did not wrap content)
    inner = (..., *[slice(3, 17)] * dim)
    diff = (torch.roll(phi, shift, dims=axes) - phi_shifted)[inner].abs().max().item()
    assert diff < 1e-10


def test_attention_starts_non_uniform_with_default_init():
    # guards the variance-preserving init: torch's default made every voxel map to the centre
    net = CARLNet(2)
    img = _blob_image(32, 2, 8, 24, seed=4).float()
    with torch.no_grad():
        phi = net.net.first.inner.first.inner(img, img)
    assert phi.std(dim=(2, 3)).min().item() > 0.05


def _warp_fn(a: float, b: float):
    return lambda x: x + a * torch.sin(torch.pi * x.flip(1)) + b


def test_twostep_composes_first_then_second():
    n = 33
    phi1 = _warp_fn(0.03, 0.1)  # a bend and a translation
    phi2 = lambda x: 0.5 + 0.7 * (_warp_fn(-0.02, 0.0)(x) - 0.5)  # noqa: E731 - a bend and a shrink
    first, second = FixedMap(phi1), FixedMap(phi2)
    moving = _blob_image(n, 2, 4, 28, seed=5)
    fixed = _blob_image(n, 2, 4, 28, seed=6)
    out = TwoStep(first, second)(moving, fixed)
    ident = coords.identity_map((n, n), dtype=torch.float64)
    expected = phi1(phi2(ident))  # a fixed point goes through the second step, then the first
    inner = (..., slice(2, -2), slice(2, -2))  # at the border phi2 leaves the grid: extrapolated there
    assert (out - expected)[inner].abs().max().item() * (n - 1) < 0.02  # linear interpolation of phi1 only
    wrong_order = phi2(phi1(ident))
    assert (out - wrong_order)[inner].abs().max().item() * (n - 1) > 0.5
    # the second step saw the moving image warped by the first, on the fixed grid
    warped, seen_fixed = second.seen[0]
    assert torch.equal(seen_fixed, fixed)
    assert torch.allclose(warped, coords.sample(moving, phi1(ident)))


def test_down_runs_inner_at_half_resolution_in_the_same_frame():
    n = 32
    affine = lambda x: 0.9 * x + 0.04 + 0.05 * x.flip(1)  # noqa: E731 - resize_map is exact on affine maps
    inner = FixedMap(affine)
    ramp = coords.identity_map((n, n), dtype=torch.float64)[:, :1]  # value = norm coordinate along axis 0
    out = Down(inner)(ramp, ramp)
    assert out.shape == (1, 2, n, n)
    assert (out - affine(coords.identity_map((n, n), dtype=torch.float64))).abs().max().item() < 1e-6
    half, _ = inner.seen[0]
    assert half.shape == (1, 1, n // 2, n // 2)
    # the half-resolution image is the same function of the norm coordinate (no half-voxel shift)
    expected = coords.identity_map((n // 2, n // 2), dtype=torch.float64)[:, :1]
    assert (half - expected)[..., 1:-1, :].abs().max().item() < 1e-6


def test_symmetrise_keeps_an_inverse_pair_and_cancels_a_shared_bias():
    n = 24
    ident = coords.identity_map((n, n), dtype=torch.float64)
    t = torch.tensor([1.5, -2.0], dtype=torch.float64).view(1, 2, 1, 1) / (n - 1)
    # an exact inverse pair (two translations) comes back unchanged
    assert torch.allclose(coords.symmetrise(ident + t, ident - t), ident + t, atol=1e-12)
    # a bias both directions share (as an untrained net moves an image registered to itself) cancels
    # to first order: a 0.8-voxel smooth bias leaves under 0.05 voxels
    y, x = ident[:, 0:1], ident[:, 1:2]
    bias = 0.8 / (n - 1) * torch.cat([torch.sin(3 * x), torch.cos(2 * y)], 1)
    out = coords.symmetrise(ident + bias, ident + bias)
    assert (bias.abs().max() * (n - 1)).item() > 0.5
    assert ((out - ident).abs().max() * (n - 1)).item() < 0.05
    # ... while a real motion stays: a translation under the bias is kept to first order
    out = coords.symmetrise(ident + t + bias, coords.compose(ident + bias, ident - t))
    assert ((out - ident - t)[..., 4:-4, 4:-4].abs().max() * (n - 1)).item() < 0.1


@pytest.mark.parametrize("dim", [2, 3])
def test_symmetrised_coordinate_attention_stays_equivariant_to_moving_translation(dim):
    n, lo, hi = 20, 7, 13
    xi = _sharp_xi(dim)
    fixed, moving = _blob_image(n, dim, lo, hi, seed=2), _blob_image(n, dim, lo, hi, seed=3)
    shift = (2, -1, 1)[:dim]
    moved = torch.roll(moving, shift, dims=tuple(range(2, 2 + dim)))
    with torch.no_grad():
        phi = Symmetrised(xi)(moving, fixed)
        phi_shifted = Symmetrised(xi)(moved, fixed)
    expected = phi + torch.tensor(shift, dtype=phi.dtype).view(1, dim, *[1] * dim) / (n - 1)
    inside = (..., *[slice(lo, hi)] * dim)
    err_vox = (phi_shifted - expected)[inside].abs().max().item() * (n - 1)
    assert err_vox < 1e-3, f"moving shifted by {shift}: the symmetrised map moved wrongly ({err_vox} voxels)"


def test_symmetric_option_defaults_from_the_card_and_keeps_an_image_registered_to_itself_in_place():
    cpu = torch.device("cpu")
    assert CARL(2, cpu).symmetric and not CARL(3, cpu).symmetric  # diffusion-trained / GradICON-trained
    img = torch.nn.functional.avg_pool2d(_blob_image(256, 2, 40, 216, 4).float(), 4, 1, 1)[..., :64, :64]
    moved = {}
    for symmetric in (False, True):
        method = CARL(2, cpu, affine_iterations=0, symmetric=symmetric)
        _, out = _drain(method.iter_run(img, img, io_steps=0))
        moved[symmetric] = ((out.map - coords.identity_map((64, 64))) * 63).norm(dim=1).mean().item()
    assert moved[True] < 0.5 * moved[False], moved


def test_checkpoint_roundtrip_and_refusals(tmp_path):
    config = {"dim": 2, "width": 4, "features": 8, "unet_channels": [4, 8]}
    net = build(**config)
    path = weights.save(tmp_path / "tiny.pt", "carl", config, net, {"dim": 2, "steps": 0})
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["method"] == "carl" and card["sha256"] and card["config"] == config
    loaded, _ = weights.load(path, "carl", 2, build)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="registers 2D images but the images are 3D"):
        weights.load(path, "carl", 3, build)
    with pytest.raises(ValueError, match="for method 'carl', not 'ran'"):
        weights.load(path, "ran", 2, build)
    shipped = weights.update_card(path, tmp_path / "shipped.pt", evaluation={"dice": 0.5})
    assert json.loads(shipped.with_suffix(".json").read_text())["evaluation"] == {"dice": 0.5}
    assert weights.load(shipped, "carl", 2, build)[1]["steps"] == 0  # the training fields are kept
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        weights.load(path, "carl", 2, build)
    with pytest.raises(FileNotFoundError, match="no shipped checkpoint named 'nope'"):
        weights.resolve("nope", "carl-2d")


def _drain(gen):
    """All Progress items of a method's ``iter_run`` and its returned output."""
    stages = []
    while True:
        try:
            stages.append(next(gen))
        except StopIteration as stop:
            return stages, stop.value


def test_method_runs_and_instance_optimisation_leaves_the_model_untouched(tmp_path):
    config = {"dim": 2, "width": 4, "features": 8, "unet_channels": [4, 8]}
    path = weights.save(tmp_path / "tiny.pt", "carl", config, build(**config), {"dim": 2})
    method = CARL(2, torch.device("cpu"), str(path))
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    moving, fixed = _blob_image(32, 2, 6, 26, 8).float(), _blob_image(32, 2, 6, 26, 9).float()
    stages, out = _drain(method.iter_run(moving, fixed, io_steps=3))
    assert out.map.shape == (1, 2, 32, 32)
    assert [p.stage for p in stages].count("instance optimisation") == 3
    assert all(torch.equal(before[k], v) for k, v in method.net.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out.state["net"].state_dict().items())
    with pytest.raises(ValueError, match="registers 2D images but the images are 3D"):
        CARL(3, torch.device("cpu"), str(path))


def test_instance_optimisation_lowers_the_pair_loss_with_the_default_schedule(tmp_path):
    # the default IO rate starts high and decays (io_lr -> io_lr_end); the pair's loss must still fall
    torch.manual_seed(0)
    config = {"dim": 2, "width": 4, "features": 8, "unet_channels": [4, 8]}
    path = weights.save(tmp_path / "tiny.pt", "carl", config, build(**config), {"dim": 2})
    method = CARL(2, torch.device("cpu"), str(path), affine_iterations=0)
    assert method.io_lr_end is not None and method.io_lr_end < method.io_lr
    moving = _blob_image(32, 2, 6, 24, 8).float()
    fixed = torch.roll(moving, (2, 3), dims=(2, 3))
    stages, _ = _drain(method.iter_run(moving, fixed, io_steps=20))
    losses = [p.loss for p in stages if p.stage == "instance optimisation"]
    assert len(losses) == 20 and losses[-1] < 0.95 * losses[0]
    assert CARL(2, torch.device("cpu"), str(path), io_lr=1e-5).io_lr_end == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="io_lr_end"):
        CARL(2, torch.device("cpu"), str(path), io_lr=1e-4, io_lr_end=1e-3)


def test_instance_optimisation_regulariser_option(tmp_path):
    # io_reg swaps the IO regulariser; the first reported loss is the symmetric loss with it
    torch.manual_seed(0)
    config = {"dim": 2, "width": 4, "features": 8, "unet_channels": [4, 8]}
    path = weights.save(tmp_path / "tiny.pt", "carl", config, build(**config), {"dim": 2})
    moving = _blob_image(32, 2, 6, 24, 8).float()
    fixed = torch.roll(moving, (2, 3), dims=(2, 3))
    first = {}
    for reg, lam in (("diffusion", 0.7), ("gradicon", 0.7)):
        method = CARL(2, torch.device("cpu"), str(path), affine_iterations=0, io_reg=reg, io_lam=lam)
        stages, _ = _drain(method.iter_run(moving, fixed, io_steps=1))
        first[reg] = [p.loss for p in stages if p.stage == "instance optimisation"][0]
        expected, _, _ = symmetric_loss(method.net, moving, fixed, reg, lam, LNCC_WINDOW[2], eps=method.io_eps)
        assert first[reg] == pytest.approx(float(expected), rel=1e-5)
    assert first["diffusion"] != pytest.approx(first["gradicon"], rel=1e-3)
    with pytest.raises(ValueError, match="io_reg must be 'gradicon' or 'diffusion'"):
        CARL(2, torch.device("cpu"), str(path), io_reg="bending")


def test_instance_optimisation_lncc_eps_option(tmp_path):
    # io_eps is the LNCC's variance floor in IO: the first reported loss uses it, and it matters
    torch.manual_seed(0)
    config = {"dim": 2, "width": 4, "features": 8, "unet_channels": [4, 8]}
    path = weights.save(tmp_path / "tiny.pt", "carl", config, build(**config), {"dim": 2})
    moving = 0.05 * _blob_image(32, 2, 6, 24, 8).float()  # low contrast: local variances ~1e-4
    fixed = torch.roll(moving, (2, 3), dims=(2, 3))
    first = {}
    for eps in (1e-5, 1e-2):
        method = CARL(2, torch.device("cpu"), str(path), affine_iterations=0, io_eps=eps)
        stages, _ = _drain(method.iter_run(moving, fixed, io_steps=1))
        first[eps] = [p.loss for p in stages if p.stage == "instance optimisation"][0]
        expected, _, _ = symmetric_loss(method.net, moving, fixed, "gradicon", IO_LAM["gradicon"], LNCC_WINDOW[2],
                                        eps=eps)
        assert first[eps] == pytest.approx(float(expected), rel=1e-5)
    assert first[1e-2] > first[1e-5] + 0.1  # a floor above the variances hides the texture
    with pytest.raises(ValueError, match="io_eps must be > 0"):
        CARL(2, torch.device("cpu"), str(path), io_eps=0)
    # unset, it is the floor the card says the net was trained with (IO uses the training loss)
    assert CARL(2, torch.device("cpu"), str(path)).io_eps == IO_EPS
    trained = weights.save(tmp_path / "eps.pt", "carl", config, build(**config),
                           {"dim": 2, "train": {"lncc_eps": 2e-5}})
    assert CARL(2, torch.device("cpu"), str(trained)).io_eps == 2e-5
    assert CARL(2, torch.device("cpu"), str(trained), io_eps=1e-3).io_eps == 1e-3


def test_optimisation_warmup_ramps_the_rate_then_decays_it():
    # loss = p has gradient 1, so plain SGD moves p by exactly the step's rate
    for warmup, lr_end, expected in ((0, None, [1, 1, 1, 1, 1]), (3, None, [0.25, 0.5, 0.75, 1, 1]),
                                     (0, 0.2, [1, 0.8, 0.6, 0.4, 0.2]), (3, 0.2, [0.25, 0.4, 0.45, 0.4, 0.2])):
        p = torch.zeros((), requires_grad=True)
        seen = [0.0]

        def loss_fn():
            return p * 1.0, p.detach()

        for _ in iter_optimise([p], loss_fn, 5, 1.0, lr_end=lr_end, optimizer=torch.optim.SGD, warmup=warmup):
            seen.append(-float(p))
        steps = [b - a for a, b in zip(seen, seen[1:])]
        assert steps == pytest.approx(expected), (warmup, lr_end)


def test_io_warmup_option(tmp_path):
    config = {"dim": 2, "width": 4, "features": 8, "unet_channels": [4, 8]}
    path = weights.save(tmp_path / "tiny.pt", "carl", config, build(**config), {"dim": 2})
    assert CARL(2, torch.device("cpu"), str(path), io_warmup=5).io_warmup == 5
    brain = CARL(2, torch.device("cpu"), str(path), **BRAIN_SETTINGS)  # the preset names real options
    assert (brain.net.passes, brain.io_eps, brain.io_lam, brain.io_warmup) == tuple(
        BRAIN_SETTINGS[k] for k in ("passes", "io_eps", "io_lam", "io_warmup"))
    with pytest.raises(ValueError, match="io_warmup must be >= 0"):
        CARL(2, torch.device("cpu"), str(path), io_warmup=-1)


def test_passes_option_applies_psi2_again_on_the_warped_image(tmp_path):
    # passes=k is TwoStep{...TwoStep{CARL, Psi2}..., Psi2}: a Psi2 that shifts by s shifts by k s
    config = {"dim": 2, "width": 4, "features": 8, "unet_channels": [4, 8]}
    path = weights.save(tmp_path / "tiny.pt", "carl", config, build(**config), {"dim": 2})
    moving, fixed = _blob_image(32, 2, 6, 26, 8).float(), _blob_image(32, 2, 6, 26, 9).float()
    ident = coords.identity_map((32, 32))
    for k in (1, 2, 3):
        method = CARL(2, torch.device("cpu"), str(path), affine_iterations=0, symmetric=False, passes=k)
        method.net.net.first = FixedMap(lambda x: x)
        psi2 = method.net.net.second = FixedMap(lambda x: x + torch.tensor([0.02, -0.01]).view(1, 2, 1, 1))
        _, out = _drain(method.iter_run(moving, fixed, io_steps=0))
        shift = (out.map - ident)[..., 8:24, 8:24]
        assert torch.allclose(shift[0, 0], torch.full((16, 16), 0.02 * k), atol=1e-5)
        assert torch.allclose(shift[0, 1], torch.full((16, 16), -0.01 * k), atol=1e-5)
        assert len(psi2.seen) == k
    assert CARL(2, torch.device("cpu"), str(path)).net.passes == PASSES
    with pytest.raises(ValueError, match="passes must be at least 1"):
        CARL(2, torch.device("cpu"), str(path), passes=0)


def test_working_shape_for_the_oasis_pair():
    shape = working_shape_for(3, (144, 192, 160), (1.0, 1.0, 1.0))
    assert all(s % 4 == 0 for s in shape)
    assert 7000 < torch.tensor(shape).div(4).prod().item() < 10000  # Xi at ~20^3 tokens
    assert working_shape_for(3, (60, 64, 64), (0.4, 0.4, 0.4)) == (60, 64, 64)  # never finer than the image


def test_token_budget_option_sets_the_working_grid(tmp_path):
    config = {"dim": 3, "width": 4, "features": 8, "unet_channels": [4, 8]}
    path = weights.save(tmp_path / "tiny.pt", "carl", config, build(**config), {"dim": 3})
    cpu = torch.device("cpu")
    small = CARL(3, cpu, str(path), tokens=12 ** 3).working_shape((144, 192, 160), (1.0, 1.0, 1.0))
    default = CARL(3, cpu, str(path)).working_shape((144, 192, 160), (1.0, 1.0, 1.0))
    assert default == working_shape_for(3, (144, 192, 160), (1.0, 1.0, 1.0))
    assert 1400 < torch.tensor(small).div(4).prod().item() < 2100  # ~12^3 tokens at Xi's quarter grid
    assert all(s % 4 == 0 for s in small) and all(a < b for a, b in zip(small, default))
    with pytest.raises(ValueError, match="tokens must be at least 8"):
        CARL(3, cpu, str(path), tokens=4)


def test_instance_optimisation_grid_is_no_finer_and_runs_through_the_stack():
    work = working_shape_for(3, (144, 192, 160), (1.0, 1.0, 1.0))
    io = io_shape_for(3, work)
    assert all(s % 4 == 0 and s <= w for s, w in zip(io, work))
    tokens = torch.tensor(io).div(4).prod().item()
    assert 0.6 * IO_TOKENS[3] < tokens < 1.5 * IO_TOKENS[3]
    assert io_shape_for(3, (16, 16, 16)) == (16, 16, 16)  # small grids are left as they are
    net = CARLNet(3, width=4, features=8, unet_channels=(4, 4, 4, 4))
    x = torch.rand(1, 1, *io_shape_for(3, (72, 92, 76)))
    assert net(x, x).shape == (1, 3, *x.shape[2:])  # every Down level gets even sizes


@pytest.mark.parametrize("dim", [2, 3])
def test_shipped_checkpoint_loads_with_its_card(dim):
    path = weights.CHECKPOINT_DIR / f"carl-{dim}d.pt"
    if not path.exists():
        pytest.skip(f"{path.name} not shipped yet")
    assert path.stat().st_size < 5e6
    method = CARL(dim, torch.device("cpu"))  # checkpoint=None -> the shipped default
    assert method.checkpoint_name == f"carl-{dim}d"
    for key in ("command", "data", "steps", "seed", "final_losses", "evaluation", "code_version"):
        assert key in method.card, key
    other = 5 - dim  # 2 <-> 3
    with pytest.raises(ValueError, match=f"registers {dim}D images but the images are {other}D"):
        weights.load(path, "carl", other, build)


@pytest.mark.parametrize("dim", [2, 3])
def test_displacement_steps_keep_their_voxel_length_on_another_grid(dim):
    from napari_register.methods.blocks import DisplacementNet

    ref = (9,) * dim
    net = DisplacementNet(dim, (4,), ref_shape=ref)
    with torch.no_grad():
        net.unet.head.bias.copy_(torch.arange(1, dim + 1, dtype=torch.float32) * 0.125)  # 1, 2, 3 voxels at n=9
    for n in (9, 17, 33):
        img = torch.rand(1, 1, *(n,) * dim)
        with torch.no_grad():
            phi = net(img, img)
        disp_vox = (phi - coords.identity_map((n,) * dim)) * (n - 1)
        centre = (..., *[n // 2] * dim)
        got = disp_vox[centre].flatten().tolist()
        assert got == pytest.approx([1.0, 2.0, 3.0][:dim], abs=1e-5), f"grid {n}: steps of {got} voxels"
    plain = DisplacementNet(dim, (4,))  # no reference: a fixed fraction of the field of view (ICON's units)
    with torch.no_grad():
        plain.unet.head.bias.fill_(0.125)
        img = torch.rand(1, 1, *(17,) * dim)
        assert float(((plain(img, img) - coords.identity_map((17,) * dim)) * 16).mean()) == pytest.approx(2.0, abs=1e-5)


def test_affine_stage_recovers_a_scaling_and_the_map_includes_it(tmp_path):
    from napari_register.instance_opt import iter_affine
    from napari_register.losses import get_similarity

    n = 40
    yy, xx = torch.meshgrid(torch.linspace(0, 1, n), torch.linspace(0, 1, n), indexing="ij")
    fixed = (torch.exp(-((yy - 0.5) ** 2 / 0.04 + (xx - 0.5) ** 2 / 0.02))
             + 0.5 * torch.exp(-((yy - 0.3) ** 2 + (xx - 0.65) ** 2) / 0.005))[None, None]
    true = torch.tensor([[1.15, 0.0, 0.5 - 1.15 * 0.5 + 0.04], [0.0, 0.9, 0.5 - 0.9 * 0.5 - 0.03], [0, 0, 1.0]])
    # moving sampled at true^-1 so that moving(true(x)) = fixed(x): true is moving_from_fixed
    moving = coords.sample(fixed, coords.matrix_map(torch.linalg.inv(true), (n, n)))
    _, m = _drain(iter_affine(moving, fixed, get_similarity("mse"), iterations=150))
    err = (coords.matrix_map(m, (n, n)) - coords.matrix_map(true, (n, n)))[..., 8:-8, 8:-8].abs().max() * (n - 1)
    assert err < 1.0, f"affine stage off by {float(err):.2f} voxels"

    config = {"dim": 2, "width": 4, "features": 8, "unet_channels": [4, 8]}
    path = weights.save(tmp_path / "tiny.pt", "carl", config, build(**config), {"dim": 2})
    # symmetric=False: the map checked below is the net's own, not its symmetrised mean
    with_affine = CARL(2, torch.device("cpu"), str(path), symmetric=False)
    without = CARL(2, torch.device("cpu"), str(path), affine_iterations=0)

    def run(method, init=None, steps=0):
        stages, out = _drain(method.iter_run(moving, fixed, steps, init=init))
        return out, [p.stage for p in stages]

    out, stages = run(with_affine)
    assert any("affine" in s for s in stages)
    assert not any("affine" in s for s in run(without)[1])
    # the map is affine o network, the network seeing the affinely pre-aligned moving image
    a = out.state["affine"]
    with torch.no_grad():
        net_map = with_affine.net(coords.sample(moving, coords.matrix_map(a, (n, n))), fixed)
    assert torch.allclose(out.map, coords.apply_matrix(a, net_map), atol=1e-6)
    assert not torch.allclose(a, torch.eye(3), atol=1e-3)
    cont, stages = run(with_affine, init=out, steps=2)  # continuing keeps the affine, does not redo it
    assert not any("affine" in s for s in stages) and torch.equal(cont.state["affine"], out.state["affine"])
