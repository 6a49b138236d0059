"""Tests of napari_register.losses: values on cases with known answers, invariances, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_register import coords, losses


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors here are tiny: with 2 threads on a busy machine OpenMP barriers made a 3 ms call 0.4 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_noise(shape: tuple[int, ...], seed: int = 0, passes: int = 2) -> torch.Tensor:
    """Textured test image ``(1, 1, *shape)``: white noise box-smoothed, scaled to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    for _ in range(passes):
        x = losses._pad_replicate(x, [1] * len(shape))
        x = losses.box_sum(x, 3) / 3 ** len(shape)
    x = (x - x.min()) / (x.max() - x.min())
    return x.float()


def lncc_reference(a: torch.Tensor, b: torch.Tensor, w: int, eps: float) -> torch.Tensor:
    """Straightforward LNCC with a non-separable average pool, to check the fast one against."""
    pool = F.avg_pool3d if a.dim() == 5 else F.avg_pool2d
    m = lambda t: pool(t, w, stride=1)  # noqa: E731
    cov = m(a * b) - m(a) * m(b)
    va = torch.relu(m(a * a) - m(a) ** 2) + eps
    vb = torch.relu(m(b * b) - m(b) ** 2) + eps
    return 1 - torch.mean(cov / torch.sqrt(va * vb))


# ----------------------------------------------------------------------------- box filter

@pytest.mark.parametrize("shape,window", [((6, 7), 3), ((5, 4, 6), (3, 1, 5))])
def test_box_sum_matches_pool_and_gradcheck(shape, window):
    x = torch.rand(1, 2, *shape, dtype=torch.float64, requires_grad=True)
    w = (window,) * len(shape) if isinstance(window, int) else window
    pool = F.avg_pool3d if len(shape) == 3 else F.avg_pool2d
    expected = pool(x, w, stride=1) * math.prod(w)
    torch.testing.assert_close(losses.box_sum(x, window), expected)
    assert torch.autograd.gradcheck(lambda t: losses.box_sum(t, window), (x,))


# ----------------------------------------------------------------------------- lncc

@pytest.mark.parametrize("shape", [(48, 40), (20, 24, 18)])
def test_lncc_self_negative_and_reference(shape):
    # intensities 0..10: local variances far above eps, so NCC(a, a) is 1 up to eps
    a = 10 * smooth_noise(shape, seed=1)
    b = (a + 3 * smooth_noise(shape, seed=2)) / 1.3
    assert losses.lncc(a, a).item() < 0.02
    assert losses.lncc(a, -a).item() > 1.98
    value = losses.lncc(a, b)
    assert 0.02 < value.item() < 0.9
    torch.testing.assert_close(value, lncc_reference(a, b, 5, 1e-3), atol=1e-5, rtol=1e-5)
    # window per axis and a window larger than the image (clamped) both work
    assert torch.isfinite(losses.lncc(a, b, window=(3,) * len(shape)))
    assert torch.isfinite(losses.lncc(a[..., :2], b[..., :2], window=9))


def test_lncc_affine_intensity_invariance():
    a = 10 * smooth_noise((24, 20, 22), seed=3)
    b = (a + 4 * smooth_noise((24, 20, 22), seed=4)) / 1.4
    base = losses.lncc(a, b).item()
    assert base > 0.05  # not trivially 0: the invariance below has something to keep
    assert losses.lncc(3 * a + 1, 2 * b - 5).item() == pytest.approx(base, abs=2e-3)
    # a negative gain flips the sign of NCC: 1 - ncc -> 1 + ncc
    assert losses.lncc(-a, b).item() == pytest.approx(2 - base, abs=1e-4)


def test_lncc_constant_patches_finite():
    a = torch.zeros(1, 1, 12, 12, 12, requires_grad=True)
    b = torch.ones(1, 1, 12, 12, 12)
    loss = losses.lncc(a, b)
    assert loss.item() == pytest.approx(1.0)  # flat patches: NCC 0, not NaN
    loss.backward()
    assert torch.isfinite(a.grad).all()


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\).*\(1, 1, 8, 9\)"):
        losses.lncc(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


# ----------------------------------------------------------------------------- MIND

def test_mind_ssc_shapes_and_range():
    d3 = losses.mind_ssc(smooth_noise((10, 12, 9)))
    d2 = losses.mind_ssc(torch.cat([smooth_noise((16, 14))] * 2, 1))  # two channels
    assert d3.shape == (1, 12, 10, 12, 9)
    assert d2.shape == (1, 8, 16, 14)
    for desc in (d3, d2):
        assert desc.min() > 0 and desc.max() <= 1 + 1e-6
        # after subtracting the per-voxel minimum distance, the smallest entry is exp(0) = 1
        torch.testing.assert_close(desc.amax(1), torch.ones_like(desc.amax(1)))
    assert torch.isfinite(losses.mind_ssc(torch.zeros(1, 1, 8, 8))).all()


@pytest.mark.parametrize("shape", [(40, 36), (20, 22, 18)])
def test_mind_modality_invariance_and_shift(shape):
    img = smooth_noise(shape, seed=5)
    inverted = 1 - img
    gamma = img ** 2  # a monotone, non-linear intensity remap
    shifted = [torch.roll(img, s, dims=2) for s in (1, 2, 3)]
    mind_shift = [losses.mind_loss(img, s).item() for s in shifted]
    # MSE says the inverted image is far more different than a shifted one; MIND says the opposite.
    assert losses.mse(img, inverted) > 5 * losses.mse(img, shifted[0])
    assert losses.mind_loss(img, inverted).item() < 1e-6
    assert losses.mind_loss(img, gamma).item() < 0.5 * mind_shift[0]
    assert mind_shift[0] < mind_shift[1] < mind_shift[2]


# ----------------------------------------------------------------------------- regularisers

def affine_map(matrix: torch.Tensor, shape: tuple[int, ...], centre: float = 0.5,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """Norm-frame map ``x -> c + M (x - c) + t`` on a grid of ``shape``, float64."""
    ident = coords.identity_map(shape, dtype=torch.float64)
    x = ident - centre
    out = torch.einsum("ij,bj...->bi...", matrix.double(), x) + centre
    if shift is not None:
        out = out + shift.double().view(1, -1, *([1] * len(shape)))
    return out


def rotation_2d(angle: float, scale: float = 1.0) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return scale * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


@pytest.mark.parametrize("shape", [(17, 13), (9, 10, 11)])
def test_regularisers_zero_for_identity_translation_affine(shape):
    d = len(shape)
    zero = torch.zeros(1, d, *shape, dtype=torch.float64)
    translation = zero + torch.linspace(0.05, 0.1, d, dtype=torch.float64).view(1, d, *([1] * d))
    matrix = torch.eye(d, dtype=torch.float64) + 0.1 * torch.arange(d * d, dtype=torch.float64).view(d, d) / d
    affine_disp = affine_map(matrix, shape) - coords.identity_map(shape, dtype=torch.float64)
    for disp in (zero, translation):
        assert losses.diffusion(disp).item() == pytest.approx(0, abs=1e-20)
        assert losses.bending(disp).item() == pytest.approx(0, abs=1e-20)
    assert losses.bending(affine_disp).item() == pytest.approx(0, abs=1e-20)
    assert losses.diffusion(affine_disp).item() > 1e-3


def test_diffusion_values_and_spacing_axis_order():
    shape = (11, 21)
    ident = coords.identity_map(shape, dtype=torch.float64)
    s = 0.2
    shear = torch.zeros_like(ident)
    shear[:, 0] = s * ident[:, 1]  # the y displacement grows along x: d u_0 / d x_1 = s
    # one of the d*d Jacobian entries is s: mean over components and axes gives s^2 / d^2
    assert losses.diffusion(shear).item() == pytest.approx(s ** 2 / 4)
    # physical units: spacing (x, y) = (1, 2) mm; extent y = 10 * 2 = 20 mm, extent x = 20 * 1 = 20 mm
    assert losses.diffusion(shear, spacing=(1.0, 2.0)).item() == pytest.approx(s ** 2 / 4)
    # spacing (x, y) = (2, 1): extent y = 10 mm, x = 40 mm, so d u_y / d x = s * 10 / 40
    assert losses.diffusion(shear, spacing=(2.0, 1.0)).item() == pytest.approx((s / 4) ** 2 / 4)
    with pytest.raises(ValueError, match="spacing needs 2 values"):
        losses.diffusion(shear, spacing=(1.0, 1.0, 1.0))


def test_bending_values():
    shape = (15, 12)
    ident = coords.identity_map(shape, dtype=torch.float64)
    s = 0.3
    quad = torch.zeros_like(ident)
    quad[:, 0] = s * ident[:, 0] ** 2  # d^2 u_0 / d x_0^2 = 2 s, averaged over 2 components
    assert losses.bending(quad).item() == pytest.approx((2 * s) ** 2 / 2)
    mixed = torch.zeros_like(ident)
    mixed[:, 1] = s * ident[:, 0] * ident[:, 1]  # d^2 u_1 / d x_0 d x_1 = s, counted twice
    assert losses.bending(mixed).item() == pytest.approx(2 * s ** 2 / 2)


def test_gradicon_zero_for_exact_inverses():
    # 3D translation by t and -t: the composition is the identity everywhere (border extrapolation)
    shape3 = (8, 9, 10)
    t = torch.tensor([0.1, -0.05, 0.2])
    ident3 = coords.identity_map(shape3, dtype=torch.float64)
    fwd, back = ident3 + t.double().view(1, 3, 1, 1, 1), ident3 - t.double().view(1, 3, 1, 1, 1)
    assert losses.gradicon(fwd, back).item() < 1e-20
    # 2D similarity transform and its inverse; the inner map shrinks, so it stays inside the grid
    shape2 = (21, 17)
    m = rotation_2d(0.3, scale=0.6)  # maps [0, 1]^2 well inside itself
    t2 = torch.tensor([0.02, -0.03], dtype=torch.float64)
    inner = affine_map(m, shape2, shift=t2)
    outer = affine_map(torch.linalg.inv(m), shape2, shift=-torch.linalg.inv(m) @ t2)
    assert losses.gradicon(outer, inner).item() < 1e-20


def test_gradicon_value_when_not_inverse():
    shape = (21, 17)
    m = rotation_2d(0.3, scale=0.6)  # maps [0, 1]^2 well inside itself
    phi = affine_map(m, shape)
    # phi o phi has Jacobian M^2; the loss is |M^2 - I|_F^2 / d (ICON's normalisation)
    expected = ((m @ m - torch.eye(2, dtype=torch.float64)) ** 2).sum().item() / 2
    assert losses.gradicon(phi, phi).item() == pytest.approx(expected, rel=1e-9)
    assert expected > 0.1


# ----------------------------------------------------------------------------- gradients, registry

def test_gradients_flow_through_every_loss():
    a = smooth_noise((12, 10, 11), seed=6).requires_grad_(True)
    b = smooth_noise((12, 10, 11), seed=7)
    for name in ("lncc", "mse", "mind"):
        a.grad = None
        losses.get_similarity(name)(a, b).backward()
        assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0, name
    g = torch.Generator().manual_seed(0)
    ident = coords.identity_map((12, 10, 11))
    phi_ab = (ident + 0.02 * torch.randn(ident.shape, generator=g)).requires_grad_(True)
    phi_ba = (ident + 0.02 * torch.randn(ident.shape, generator=g)).requires_grad_(True)
    disp = (phi_ab - ident)
    (losses.gradicon(phi_ab, phi_ba) + losses.diffusion(disp) + losses.bending(disp)).backward()
    for t in (phi_ab, phi_ba):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,spacing", [((5, 6), (0.5, 2.0)), ((4, 5, 3), (1.0, 0.7, 1.3))])
def test_custom_backward_matches_numerical_gradient(shape, spacing):
    # diffusion, bending and box_sum have hand-written backward passes: check them numerically
    d = len(shape)
    u = torch.rand(2, d, *shape, dtype=torch.float64, requires_grad=True)
    for fn in (losses.diffusion, losses.bending):
        assert torch.autograd.gradcheck(lambda t: fn(t, spacing=spacing), (u,)), fn.__name__
    a = torch.rand(1, 1, *shape, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 1, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: losses.lncc(x, y, window=3), (a, b))


def test_get_similarity_binds_kwargs_and_rejects_unknown():
    a, b = smooth_noise((30, 30), seed=8), smooth_noise((30, 30), seed=9)
    assert losses.get_similarity("lncc", window=3)(a, b) == losses.lncc(a, b, window=3)
    assert losses.get_similarity("mse") is losses.mse
    with pytest.raises(ValueError, match=r"'ncc'.*\['lncc', 'mi', 'mind', 'mse'\]"):
        losses.get_similarity("ncc")
