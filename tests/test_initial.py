"""The initial alignment every method starts from (napari_register.initial) and the pipeline's
start-against-result check (api.check_result): large offsets and rotations are recovered, and
nothing is returned that matches the images worse than the start."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_register.api import check_result, register
from napari_register.coords import Geometry, matrix_map, sample
from napari_register.image import Image
from napari_register.initial import InitialSettings, candidates, centre_of_mass, initial_stage, iter_initial
from napari_register.instance_opt import iter_affine
from napari_register.losses import get_similarity
from napari_register.methods.registry import MethodOutput
from test_carl import _drain  # all Progress items of a generator and its returned value


def _blob_image(shape, centre, seed=0):
    """A smooth asymmetric scene (three blobs of different size and brightness) on a faint texture."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    img = 0.02 * rng.random(shape)
    for offset, radius, value in (((0, 0), 6.0, 1.0), ((-9, 5), 3.5, 0.6), ((6, 8), 2.5, 0.8)):
        off = list(offset) + [0] * (len(shape) - 2)
        r2 = sum((g - c - o) ** 2 for g, c, o in zip(grids, centre, off))
        img += value * np.exp(-r2 / (2 * radius ** 2))
    return torch.from_numpy(img.astype(np.float32))[None, None]


def _rotated(img: torch.Tensor, degrees: float, shift_px=(0.0, 0.0)) -> torch.Tensor:
    """``img`` rotated about its grid centre and shifted (pixels), by resampling."""
    h, w = img.shape[2:]
    a = math.radians(degrees)
    scale = torch.tensor([h - 1.0, w - 1.0])
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = rot / scale[None, :] * scale[:, None]
    m = torch.eye(3)
    m[:2, :2] = lin
    c = torch.tensor([0.5, 0.5])
    m[:2, 2] = c - lin @ c - torch.tensor(shift_px) / scale
    return sample(img, matrix_map(m, (h, w)))


def _error_px(matrix: torch.Tensor, truth_moving: torch.Tensor, fixed: torch.Tensor) -> float:
    """Mean absolute difference between the moving image resampled by ``matrix`` and the fixed one."""
    warped = sample(truth_moving, matrix_map(matrix, tuple(fixed.shape[2:])))
    return float((warped - fixed).abs().mean())


def test_a_rotated_and_shifted_section_is_recovered_where_a_plain_affine_fit_is_not():
    fixed = _blob_image((64, 64), (30, 28))
    moving = _rotated(fixed, 120, shift_px=(6, -5))  # a section mounted at another angle, off centre
    sim = get_similarity("mse")  # the search is tested here, not a similarity's landscape
    _, plain = _drain(iter_affine(moving, fixed, sim, iterations=50))
    steps, m = _drain(iter_initial(moving, fixed, sim, InitialSettings()))
    before = _error_px(torch.eye(3), moving, fixed)
    assert _error_px(m, moving, fixed) < 0.15 * before  # recovered
    # the fixed-step fit from the identity moves the big blob, not the rotation
    assert _error_px(plain, moving, fixed) > 2 * _error_px(m, moving, fixed)
    # progress: one stage, ending at exactly its planned total
    plan = initial_stage((64, 64), InitialSettings(), "affine")
    assert {p.stage for p in steps} == {"affine"} and steps[-1].step == steps[-1].total == plan.steps


def test_a_large_translation_in_3d_starts_from_the_centres_of_mass():
    fixed = _blob_image((40, 40, 40), (16, 15, 20))
    moving = torch.roll(fixed, shifts=(9, 10, -8), dims=(2, 3, 4))  # about a quarter of the extent
    c_f, c_m = centre_of_mass(fixed), centre_of_mass(moving)
    np.testing.assert_allclose((c_m - c_f).numpy() * 39, [9, 10, -8], atol=1.0)
    (start,) = candidates(moving, fixed, InitialSettings())  # 3D: no rotations by default
    np.testing.assert_allclose(start[:3, 3].numpy() * 39, [9, 10, -8], atol=1.0)
    _, m = _drain(iter_initial(moving, fixed, get_similarity("mse"), InitialSettings()))
    np.testing.assert_allclose(m[:3, 3].numpy() * 39, [9, 10, -8], atol=1.0)


def test_the_identity_is_kept_when_nothing_beats_it():
    fixed = _blob_image((48, 48), (22, 25), seed=3)
    sim = get_similarity("mse")
    _, m = _drain(iter_initial(fixed.clone(), fixed, sim, InitialSettings()))
    np.testing.assert_allclose(m.numpy(), np.eye(3), atol=2e-3)  # already aligned: stays aligned
    rng = torch.Generator().manual_seed(0)
    noise_m, noise_f = torch.rand(1, 1, 48, 48, generator=rng), torch.rand(1, 1, 48, 48, generator=rng)
    _, m = _drain(iter_initial(noise_m, noise_f, sim, InitialSettings()))
    start = float(sim(noise_m, noise_f))
    assert float(sim(sample(noise_m, matrix_map(m, (48, 48))), noise_f)) <= start  # never worse


def test_flips_are_tried_only_when_asked():
    img = _blob_image((32, 32), (15, 15))
    assert len(candidates(img, img, InitialSettings())) == 12
    assert len(candidates(img, img, InitialSettings(flips=True))) == 24
    assert len(candidates(img, img, InitialSettings(rotations=90))) == 4


def test_check_result_keeps_the_start_when_the_result_is_worse():
    fixed = _blob_image((48, 48), (22, 25))
    moving = torch.roll(fixed, 3, dims=3)
    good = torch.eye(3)
    good[1, 2] = 3 / 47  # moving_from_fixed: x + 3 px
    bad = torch.eye(3)
    bad[1, 2] = -8 / 47
    for matrix, kept in ((good, "result"), (bad, "start")):
        out, quality = check_result(MethodOutput(map=matrix_map(matrix, (48, 48)), matrix=matrix), moving, fixed)
        assert quality["kept"] == kept and quality["measure"] == "MIND-SSC"
        assert (quality["result"] < quality["start"]) == (kept == "result")
        if kept == "start":
            np.testing.assert_allclose(out.matrix.numpy(), np.eye(3))
            np.testing.assert_allclose(out.map.numpy(), matrix_map(torch.eye(3), (48, 48)).numpy())


def test_a_wrong_method_result_never_reaches_the_user(monkeypatch):
    """A method whose map is wrong: the pipeline returns the start, says so, and records both scores."""
    import napari_register.methods.optimize as opt

    def wrong(self, moving, fixed, io_steps, init=None):
        m = torch.eye(3)
        m[:2, 2] = torch.tensor([0.2, -0.15])  # a confident, far-off answer
        yield from ()
        return MethodOutput(map=matrix_map(m, tuple(fixed.shape[2:])))

    monkeypatch.setattr(opt.Optimize, "iter_run", wrong)
    fixed = _blob_image((48, 48), (22, 25))[0, 0].numpy()
    g = Geometry.default((48, 48))
    res = register(Image(np.roll(fixed, 2, axis=1), g), Image(fixed, g), method="optimize", device="cpu")
    assert res.quality["kept"] == "start" and res.quality["result"] > res.quality["start"]
    assert any("worse than its start" in n for n in res.notes)
    np.testing.assert_allclose(res.field.disp, 0.0, atol=1e-5)  # the centre alignment, nothing else


@pytest.mark.parametrize("method", ["optimize", "carl"])
def test_a_good_prealignment_is_not_made_worse(method):
    """Seeded with the exact answer, a method's result must match at least as well as that seed."""
    from napari_register.transforms import MatrixTransform

    fixed = _blob_image((64, 64), (30, 28))[0, 0].numpy()
    moving = np.roll(fixed, (7, -6), axis=(0, 1))
    g = Geometry.default((64, 64))
    seed = MatrixTransform.translation(np.array([-6.0, 7.0]))  # (x, y): moving = fixed shifted
    res = register(Image(moving, g), Image(fixed, g), method=method, device="cpu", prealign=seed)
    assert res.quality["kept"] == "start" or res.quality["result"] <= res.quality["start"]
    err = np.abs(res.warped.array - fixed)[8:-8, 8:-8].mean()
    start = np.abs(np.roll(moving, (-7, 6), axis=(0, 1)) - fixed)[8:-8, 8:-8].mean()
    assert err <= start + 0.01
