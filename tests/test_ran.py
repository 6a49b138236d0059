"""RAN: the network's structure and identity start, the accumulator's fusion, the edge-aware loss,
the supervised pre-training pairs, training through the shared loop, and the registered method."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from napari_register import coords, weights
from napari_register.losses import edge_aware_smoothness
from napari_register.methods.ran import (RANNet, ResidualAligner, build, map_from_voxels, unsupervised_loss,
                                         voxels_from_map)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dim, shape", [(2, (32, 40)), (3, (16, 24, 16))])
@pytest.mark.parametrize("heads, q", [(6, 3), (1, 0), (3, 2)])
def test_untrained_network_is_the_identity_for_any_pair(dim, shape, heads, q):
    torch.manual_seed(0)
    net = RANNet(dim, heads=heads, q=q)
    phi = net(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    assert phi.shape == (2, dim, *shape)
    assert torch.equal(phi, coords.identity_map(shape).expand(2, -1, *shape))


@pytest.mark.parametrize("q, pools", [(0, [8, 4, 2, 1]), (1, [2, 4, 2, 1]), (3, [2, 2, 2, 1])])
def test_motion_aware_levels_work_on_the_half_grid_with_dilations_keeping_the_receptive_field(q, pools):
    net = RANNet(2, q=q)
    assert net.pools == pools
    feats = net.features(torch.rand(1, 1, 32, 48))
    assert [tuple(f.shape[2:]) for f in feats] == [(32 // p, 48 // p) for p in pools]
    # the first decoder level's convs are dilated by the pool it skipped (8 -> 2: x4)
    first = net.decoder[0].body[0]
    assert first.dilation == (8 // pools[0],) * 2
    regressor = [a.regress[0].dilation[0] for a in net.aligners]
    assert regressor == ([8, 4, 2, 1] if q == 3 else [2, 2, 2, 1] if q == 0 else [8, 2, 2, 1])


def test_feature_extractor_is_siamese():
    torch.manual_seed(1)
    net = RANNet(2).eval()
    a, b = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    joint = net.features(torch.cat([a, b]))
    alone = net.features(b)
    for j, s in zip(joint, alone):
        assert torch.allclose(j[1:], s, atol=1e-4)


def test_accumulator_starts_as_previous_field_plus_masked_heads_then_learns_its_own_fusion():
    torch.manual_seed(2)
    ra = ResidualAligner(2, channels=4, heads=3, dilation=1, pool=2)
    torch.nn.init.normal_(ra.field.weight, std=0.1)
    f_src, f_tgt = torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8)
    disp, theta = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 8, 8)
    out, theta_new = ra(f_src, f_tgt, disp, theta)
    # recompute the paper's pieces by hand
    shape = (8, 8)
    per_axis = torch.tensor([1 / 15, 1 / 15]).view(1, 2, 1, 1)
    warped = coords.sample(f_src, coords.identity_map(shape) + disp * per_axis)
    hidden = ra.regress(torch.cat([f_tgt, warped], 1))
    heads = ra.field(hidden).view(1, 2, 3, *shape) * 2
    attr = ra.attr(hidden)
    mask = torch.softmax(ra.attr_fuse(torch.cat([attr, theta], 1)), 1)
    assert torch.allclose(mask.sum(1), torch.ones(1, *shape))
    expected = disp + (heads * mask[:, None]).sum(2)  # confidences start at 1, C4 at the plain sum
    assert torch.allclose(out, expected, atol=1e-5)
    assert theta_new.shape == theta.shape
    # the confidence scales the new heads: a confidence map of 0 leaves the previous field
    with torch.no_grad():
        ra.conf.bias.fill_(-30.0)
    out0, _ = ra(f_src, f_tgt, disp, theta)
    assert torch.allclose(out0, torch.zeros_like(out0), atol=1e-5)  # previous field's confidence 0 too
    with torch.no_grad():
        ra.fuse.weight[0, -1, 1, 1] = 1.0  # C4's direct path of the previous field
    out1, _ = ra(f_src, f_tgt, disp, theta)
    assert torch.allclose(out1, disp, atol=1e-5)


def test_one_fusion_convolution_is_shared_by_the_displacement_components():
    ra = ResidualAligner(3, channels=4, heads=2, dilation=1, pool=1)
    assert ra.fuse.in_channels == 2 + 2 and ra.fuse.out_channels == 1


def test_edge_aware_smoothness_is_zero_for_translations_and_cheaper_across_edges():
    shape = (32, 32)
    image = torch.zeros(1, 1, *shape)
    image[..., 16:] = 1.0  # an edge between columns 15 and 16
    shift = torch.full((1, 2, *shape), 3.0)
    assert edge_aware_smoothness(shift, image, 1.0) == 0
    at_edge, elsewhere = torch.zeros(1, 2, *shape), torch.zeros(1, 2, *shape)
    at_edge[:, :, :, 16:] = 1.0      # the field jumps where the image does
    elsewhere[:, :, :, 8:] = 1.0     # the same jump inside a flat region
    assert edge_aware_smoothness(at_edge, image, 1.0) < edge_aware_smoothness(elsewhere, image, 1.0)
    assert edge_aware_smoothness(at_edge, image, 0.0) == edge_aware_smoothness(elsewhere, image, 0.0)
    weight = math.exp(-1.0)
    assert float(edge_aware_smoothness(at_edge, image, 1.0)) == pytest.approx(
        float(edge_aware_smoothness(elsewhere, image, 1.0)) * weight, rel=1e-5)


def test_voxel_and_norm_maps_round_trip():
    disp = torch.randn(1, 3, 8, 12, 10)
    assert torch.allclose(voxels_from_map(map_from_voxels(disp)), disp, atol=1e-5)


def test_rigid_pretraining_map_is_a_rotation_in_voxel_space_and_the_pair_obeys_it():
    from napari_register.data.pairs import PairSource
    from napari_register.data.synthmorph import random_rigid_map

    g = torch.Generator().manual_seed(3)
    shape = (20, 30, 24)
    phi = random_rigid_map(shape, g, max_angle=20, max_shift=0.1, max_scale=0.0, max_disp=0.0)
    size = torch.tensor([19.0, 29.0, 23.0])
    corners = (phi * size.view(1, 3, 1, 1, 1)).flatten(2)[0].T[[0, -1]]  # voxel positions of two corners
    assert float(torch.dist(corners[0], corners[1])) == pytest.approx(float(size.norm()), rel=1e-4)  # lengths kept
    assert not torch.allclose(phi, coords.identity_map(shape), atol=1e-3)

    source = PairSource(2, (32, 32), batch=2, real_fraction=0.0, seed=0)
    batches = source.supervised_batches(2)
    first = next(batches)
    assert set(first) == {"moving", "fixed", "truth"} and first["truth"].shape == (2, 2, 32, 32)
    next(batches)
    assert set(next(batches)) == {"moving", "fixed"}  # then the unsupervised pairs


def _args(tmp_path, steps, pretrain, config="{}", name="ran"):
    return argparse.Namespace(method="ran", dim=2, out=str(tmp_path / f"{name}.pt"), run_dir=None, steps=steps,
                              batch=2, lr=1e-3, shape=[32, 32], seed=0, save_every=steps, keep_every=0,
                              device="cpu", threads=1, init=None, config=config,
                              recipe_options=json.dumps({"pretrain": pretrain, "real_fraction": 0.0}))


def test_training_runs_both_stages_and_the_checkpoint_loads_in_the_method(tmp_path):
    from napari_register.methods.registry import get_method
    from napari_register.training.loop import train

    path = train(_args(tmp_path, 4, 2, config='{"heads": 2}'))
    log = [json.loads(line) for line in (tmp_path / "ran.run" / "log.jsonl").read_text().splitlines()]
    assert "field_mse_vox" in log[0] and "field_mse_vox" in log[1]
    assert "sim" in log[2] and "smooth" in log[3]
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["method"] == "ran" and card["config"]["heads"] == 2 and card["train"]["pretrain"] == 2
    method = get_method("ran")(2, torch.device("cpu"), path, affine_iterations=0)
    assert method.net.heads == 2 and not method.net.training


def test_field_supervision_learns_a_known_displacement(tmp_path):
    """The pre-training signal is learnable: on a fixed batch of known maps the field error falls."""
    from napari_register.data.pairs import PairSource

    torch.manual_seed(0)
    batch = next(PairSource(2, (32, 32), batch=4, real_fraction=0.0, seed=5).supervised_batches(1))
    net = build(dim=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    truth = voxels_from_map(batch["truth"])

    @torch.no_grad()
    def error() -> float:
        return float((voxels_from_map(net(batch["moving"], batch["fixed"])) - truth).square().sum(1).mean())

    start = error()
    for _ in range(60):
        loss = (voxels_from_map(net(batch["moving"], batch["fixed"])) - truth).square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error() < 0.5 * start


def test_unsupervised_loss_prefers_the_true_map():
    from napari_register.data.pairs import PairSource

    batch = next(PairSource(2, (48, 48), batch=1, real_fraction=0.0, seed=7).supervised_batches(1))

    class Fixed(torch.nn.Module):
        def __init__(self, phi):
            super().__init__()
            self.phi = phi

        def forward(self, m, f):
            return self.phi

    truth = unsupervised_loss(Fixed(batch["truth"]), batch["moving"], batch["fixed"])[0]
    ident = unsupervised_loss(Fixed(coords.identity_map((48, 48))), batch["moving"], batch["fixed"])[0]
    assert truth < ident


def _shipped(dim):
    path = weights.CHECKPOINT_DIR / f"ran-{dim}d.pt"
    if not path.exists():
        pytest.skip(f"{path.name} not shipped")
    return path


@pytest.mark.parametrize("dim", [2, 3])
def test_shipped_checkpoint_loads_safely_with_its_card(dim):
    from napari_register.methods.registry import get_method

    path = _shipped(dim)
    assert path.stat().st_size < 8e6
    method = get_method("ran")(dim, torch.device("cpu"))
    card = method.card
    assert card["method"] == "ran" and card["dim"] == dim and card["command"].startswith("napari-register train")
    assert card["steps"] > 0 and "code_version" in card and card["data"]["excluded"]
    assert card["sha256"] == weights.sha256(path) if "sha256" in card else True


def test_shipped_2d_network_registers_a_deformed_image_and_io_keeps_the_model(tmp_path):
    from napari_register.api import register
    from napari_register.data.synthmorph import random_rigid_map, synthetic_image
    from napari_register.coords import Geometry
    from napari_register.image import Image

    _shipped(2)
    g = torch.Generator().manual_seed(11)
    base = synthetic_image((96, 96), g)
    fixed_t = coords.sample(base, random_rigid_map((96, 96), g, max_angle=5, max_shift=0.04, max_disp=2.0))
    moving = Image(base[0, 0].numpy(), Geometry.default((96, 96)))
    fixed = Image(fixed_t[0, 0].numpy(), Geometry.default((96, 96)))
    before = weights.sha256(weights.CHECKPOINT_DIR / "ran-2d.pt")
    res = register(moving, fixed, method="ran", options={"affine_iterations": 0}, io_steps=0, device="cpu")
    res_io = register(moving, fixed, method="ran", options={"affine_iterations": 0}, io_steps=3, device="cpu")
    err0 = float(abs(fixed.array - moving.array).mean())
    err = float(abs(res.warped.array - fixed.array).mean())
    assert err < 0.8 * err0
    assert float(abs(res_io.warped.array - fixed.array).mean()) < err0
    assert weights.sha256(weights.CHECKPOINT_DIR / "ran-2d.pt") == before
