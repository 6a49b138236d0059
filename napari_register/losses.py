"""Similarity measures and regularisers, dimension-agnostic (2D and 3D) and differentiable.

Images are ``(B, C, *spatial)`` tensors; maps and displacements are ``(B, d, *spatial)`` tensors in
the ``norm`` frame of :mod:`napari_register.coords` (channel ``i`` = coordinate along array axis
``i``, corner voxel centres at 0 and 1). Every loss returns a scalar tensor, 0 at the optimum.

Local window sums (LNCC, MIND) use one separable box filter, :func:`box_sum`, whose backward pass
is itself a box filter: it runs in the inner loop of instance optimisation on whole volumes.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import coords

Window = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------- building blocks

def _window_tuple(window: Window, spatial: Sequence[int]) -> tuple[int, ...]:
    """Per-axis window sizes, clamped to the image so tiny images still get a (smaller) window."""
    d = len(spatial)
    w = (int(window),) * d if isinstance(window, int) else tuple(int(k) for k in window)
    if len(w) != d or min(w) < 1:
        raise ValueError(f"window must be a positive int or {d} positive ints for a {d}D image, got {window!r}")
    return tuple(min(k, n) for k, n in zip(w, spatial))


def _sum_shifted(x: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Valid-region sum of ``k >= 2`` consecutive samples along ``axis``: one allocation, k-2 in-place adds."""
    n = x.shape[axis] - k + 1
    out = x.narrow(axis, 0, n) + x.narrow(axis, 1, n)
    for s in range(2, k):
        out += x.narrow(axis, s, n)
    return out


def _sum_spread(g: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Adjoint of :func:`_sum_shifted`: the zero-padded ("full") box sum, ``k - 1`` longer on ``axis``."""
    shape = list(g.shape)
    n = shape[axis]
    shape[axis] = n + k - 1
    out = g.new_zeros(shape)
    for s in range(k):
        out.narrow(axis, s, n).add_(g)
    return out


class _BoxSum(torch.autograd.Function):
    # A custom backward because autograd's own gradient of the k shifted views zero-fills and
    # accumulates k full-size tensors per axis; the adjoint of a valid box sum is a zero-padded
    # ("full") box sum, which is the same cheap shifted-add. ~2x faster on 160x192x144 volumes.

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.window = window
        for axis, k in enumerate(window, start=2):
            if k > 1:
                x = _sum_shifted(x, axis, k)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        for axis, k in enumerate(ctx.window, start=2):
            if k > 1:
                grad = _sum_spread(grad, axis, k)
        return grad, None


def box_sum(x: torch.Tensor, window: Window) -> torch.Tensor:
    """Separable box sum over the *valid* region: ``(B, C, *S) -> (B, C, *(S - window + 1))``."""
    return _BoxSum.apply(x, _window_tuple(window, x.shape[2:]))


def _pad_replicate(x: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """Pad each spatial axis ``i`` by ``pads[i]`` on both sides, repeating the border value."""
    flat = [p for p in reversed(pads) for _ in (0, 1)]  # F.pad wants the last axis first
    return F.pad(x, flat, mode="replicate")


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape or a.dim() not in (4, 5):
        raise ValueError(f"{name}: expected two (B, C, *spatial) tensors of the same 2D or 3D shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}; resample one onto the other's grid first")


def _diff(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Forward difference along ``axis`` (one sample shorter there)."""
    n = x.shape[axis] - 1
    return x.narrow(axis, 1, n) - x.narrow(axis, 0, n)


def _diff_adjoint(e: torch.Tensor, axis: int) -> torch.Tensor:
    """Adjoint of :func:`_diff`: ``out[k] = e[k-1] - e[k]`` (zero outside), one sample longer."""
    shape = list(e.shape)
    n = shape[axis]
    shape[axis] = n + 1
    out = e.new_zeros(shape)
    out.narrow(axis, 1, n).add_(e)
    out.narrow(axis, 0, n).sub_(e)
    return out


class _DiffEnergy(torch.autograd.Function):
    # sum over terms k of w_k * mean_c(comp2[c] * mean((D_k u)_c^2)), D_k = forward differences along
    # the axes of term k in turn. A custom backward (sum_k 2 w_k comp2 D_k^T D_k u / N_k into one
    # buffer) because autograd's own gradient of the narrowed views zero-fills and copies a
    # full-size tensor for every difference: ~2x faster on whole-volume fields, which the
    # regularisers see at every optimiser step.

    @staticmethod
    def forward(ctx, u: torch.Tensor, terms: tuple[tuple[tuple[int, ...], float], ...],  # type: ignore[override]
                comp2: torch.Tensor) -> torch.Tensor:
        diffs: dict[tuple[int, ...], torch.Tensor] = {(): u}
        for axes, _ in terms:  # share D_j u between the terms that start with it
            for k in range(1, len(axes) + 1):
                if axes[:k] not in diffs:
                    diffs[axes[:k]] = _diff(diffs[axes[:k - 1]], axes[k - 1])
        saved = [diffs[axes] for axes, _ in terms]
        ctx.terms = terms
        ctx.save_for_backward(comp2, *saved)
        total = u.new_zeros(())
        for (_, weight), t in zip(terms, saved):
            per_component = t.square().sum(dim=[0, *range(2, t.dim())])
            total = total + weight * (per_component * comp2).sum() / t.numel()
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        comp2, *saved = ctx.saved_tensors
        total = None
        for (axes, weight), t in zip(ctx.terms, saved):
            g = t * (comp2.view(1, -1, *([1] * (t.dim() - 2))) * (2 * weight * grad / t.numel()))
            for axis in reversed(axes):
                g = _diff_adjoint(g, axis)
            total = g if total is None else total.add_(g)
        return total, None, None


# ----------------------------------------------------------------------------- similarity

def _masked_mean(x: torch.Tensor, where: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean of ``x (B, C, *S)``, over the voxels of the bool ``where (B, 1, *S')`` when given
    (``S'`` >= ``S``: the mask is cropped centrally, as a valid-region filter crops its output)."""
    if where is None:
        return torch.mean(x)
    for axis in range(2, x.dim()):
        cut = (where.shape[axis] - x.shape[axis]) // 2
        where = where.narrow(axis, cut, x.shape[axis])
    w = where.to(x.dtype).expand_as(x)
    return (x * w).sum() / w.sum().clamp_min(1.0)


def mse(a: torch.Tensor, b: torch.Tensor, where: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared difference of two ``(B, C, *S)`` images (inside ``where``, see :func:`_masked_mean`)."""
    _check_pair(a, b, "mse")
    return _masked_mean((a - b) ** 2, where)


def lncc(a: torch.Tensor, b: torch.Tensor, window: Window = 5, eps: float = 1e-3,
         where: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local normalised cross-correlation loss ``1 - mean(NCC)`` of two ``(B, C, *S)`` images.

    Signed NCC, as ICON/CARL use: 0 for identical images (where they have texture), 1 for
    uncorrelated ones, 2 for an inverted contrast. The signed form keeps a gradient at NCC = 0,
    where the squared NCC of voxelmorph has a flat saddle, and it rejects contrast inversions.
    Windows are ``window`` voxels wide (int or one per axis) and lie wholly inside the image (the
    valid region), so there are no padding artefacts at the borders. ``eps`` (squared intensity
    units) is added to each local variance: a flat patch scores NCC 0 instead of NaN, and patches
    whose standard deviation is below ``sqrt(eps)`` count as partly flat.
    """
    _check_pair(a, b, "lncc")
    c = a.shape[1]
    w = _window_tuple(window, a.shape[2:])
    n = float(math.prod(w))
    # The local moments, in two passes of the box filter so that when only ``a`` needs a gradient
    # (the fixed image is a constant) the backward pass filters three channels, not five.
    mean_a, mean_aa, mean_ab = torch.split(box_sum(torch.cat([a, a * a, a * b], 1), w) / n, c, dim=1)
    mean_b, mean_bb = torch.split(box_sum(torch.cat([b, b * b], 1), w) / n, c, dim=1)
    cov = mean_ab - mean_a * mean_b
    var_a = torch.relu(mean_aa - mean_a * mean_a) + eps  # relu: rounding can make E[a^2]-E[a]^2 < 0
    var_b = torch.relu(mean_bb - mean_b * mean_b) + eps
    # ``where``: only windows centred where the fixed image has structure count (an affine fit over
    # flat windows too gains by magnifying the moving image onto them)
    return 1 - _masked_mean(cov * torch.rsqrt(var_a * var_b), where)


def _neighbour_pairs(d: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pairs of the 2d axis neighbours (unit offsets) that lie sqrt(2) apart: 12 in 3D, 4 in 2D."""
    units = []
    for axis in range(d):
        for sign in (-1, 1):
            units.append(tuple(sign if i == axis else 0 for i in range(d)))
    return [(p, q) for p, q in itertools.combinations(units, 2)
            if sum((i - j) ** 2 for i, j in zip(p, q)) == 2]


def mind_ssc(img: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013) of ``img (B, C, *S)``: ``(B, C*K, *S)``.

    For every pair of axis neighbours ``p, q`` (at ``dilation`` voxels from the centre) that are
    sqrt(2) * dilation apart - the 12 pairs of the six-neighbourhood in 3D, the 4 pairs of the
    four-neighbourhood in 2D - the patch distance ``D = box_mean((I(x+p) - I(x+q))^2)`` over a
    ``(2 radius + 1)`` box; then ``exp(-(D - min_K D) / V)`` with ``V`` the mean of ``D - min_K D``
    over the K pairs (the local variance estimate of the paper), clamped to [1e-3, 1e3] times its
    image mean. Borders repeat the edge value, so the descriptor has the image's size.
    """
    if img.dim() not in (4, 5):
        raise ValueError(f"mind_ssc: expected a (B, C, H, W) or (B, C, D, H, W) image, got {tuple(img.shape)}")
    bsz, c, *spatial = img.shape
    d = len(spatial)
    x = _pad_replicate(img.reshape(bsz * c, 1, *spatial), [dilation] * d)

    def shifted(offset: tuple[int, ...]) -> torch.Tensor:
        # the image read at x + dilation * offset, cropped back to the original grid
        out = x
        for axis, o in enumerate(offset, start=2):
            out = out.narrow(axis, dilation + o * dilation, spatial[axis - 2])
        return out

    pairs = _neighbour_pairs(d)
    units = sorted({p for pair in pairs for p in pair})
    # all neighbours in one tensor, each read once; then all pair differences in one indexed op
    neighbours = torch.cat([shifted(u) for u in units], 1)
    first = torch.tensor([units.index(p) for p, _ in pairs], device=img.device)
    second = torch.tensor([units.index(q) for _, q in pairs], device=img.device)
    diff = neighbours.index_select(1, first) - neighbours.index_select(1, second)
    # box *sums*, not means: the descriptor below is invariant to a common scale of the distances
    dist = box_sum(_pad_replicate(diff * diff, [radius] * d), 2 * radius + 1)
    dist = dist - dist.amin(1, keepdim=True)
    var = dist.mean(1, keepdim=True)
    scale = var.mean().detach()  # a constant bound, as in the reference implementation
    var = var.clamp(scale * 1e-3 + 1e-12, scale * 1e3 + 1e-12)  # + 1e-12: a constant image has scale 0
    desc = torch.exp(dist / -var)  # negate the K-times smaller tensor
    return desc.reshape(bsz, c * len(pairs), *spatial)


def mind_loss(a: torch.Tensor, b: torch.Tensor, radius: int = 1, dilation: int = 2,
              where: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared difference of the MIND-SSC descriptors of two ``(B, C, *S)`` images (over the
    voxels of the boolean ``(B, 1, *S)`` mask ``where`` when given)."""
    _check_pair(a, b, "mind_loss")
    return _masked_mean((mind_ssc(a, radius, dilation) - mind_ssc(b, radius, dilation)) ** 2, where)


def structure(img: torch.Tensor, window: int = 5, fraction: float = 0.1) -> torch.Tensor:
    """Where ``img (B, C, *S)`` has structure: a local variance (``window`` box) above ``fraction`` of
    its image mean; ``(B, 1, *S)`` bool."""
    d = img.dim() - 2
    pool = F.avg_pool3d if d == 3 else F.avg_pool2d
    x = img.mean(1, keepdim=True)
    mean = pool(x, window, stride=1, padding=window // 2, count_include_pad=False)
    var = (pool(x * x, window, stride=1, padding=window // 2, count_include_pad=False) - mean ** 2).clamp_min(0)
    return var > fraction * var.mean()


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 32, where: Optional[torch.Tensor] = None,
                       max_voxels: int = 65536) -> torch.Tensor:
    """Negative normalised mutual information ``-(H(a) + H(b)) / H(a, b)`` (Studholme) of two
    ``(B, C, *S)`` images in [0, 1] (inside ``where`` when given): the global statistical measure of
    the classical multimodal affine (Mattes MI in ANTs and elastix). Parzen windows: each voxel adds
    a Gaussian of one bin's width to the joint histogram, so the loss is differentiable. At most
    ``max_voxels`` voxels (an even stride) enter the histogram; -2 for identical images, -1 for
    independent ones."""
    _check_pair(a, b, "mutual_information")
    x, y = a.mean(1).flatten(), b.mean(1).flatten()
    if where is not None:
        keep = where.flatten()
        x, y = x[keep], y[keep]
    step = max(1, x.numel() // max_voxels)
    x, y = x[::step].clamp(0, 1), y[::step].clamp(0, 1)
    centres = torch.linspace(0, 1, bins, dtype=x.dtype, device=x.device)
    width = 1.0 / (bins - 1)
    wx = torch.exp(-0.5 * ((x[:, None] - centres) / width) ** 2)
    wy = torch.exp(-0.5 * ((y[:, None] - centres) / width) ** 2)
    wx = wx / wx.sum(1, keepdim=True)
    wy = wy / wy.sum(1, keepdim=True)
    joint = (wx.T @ wy) / max(x.numel(), 1)
    px, py = joint.sum(1), joint.sum(0)
    h = lambda p: -(p * torch.log(p + 1e-12)).sum()  # noqa: E731
    return -(h(px) + h(py)) / h(joint).clamp_min(1e-12)


_SIMILARITIES: dict[str, Callable[..., torch.Tensor]] = {"lncc": lncc, "mse": mse, "mind": mind_loss,
                                                          "mi": mutual_information}


def get_similarity(name: str, **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The similarity loss called ``name`` (``"lncc"``, ``"mse"``, ``"mind"``), ``kwargs`` bound."""
    try:
        fn = _SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity {name!r}; known: {sorted(_SIMILARITIES)}") from None
    return functools.partial(fn, **kwargs) if kwargs else fn


# ----------------------------------------------------------------------------- regularisers

def _scales(disp: torch.Tensor, spacing: Optional[Sequence[float]]) -> tuple[torch.Tensor, list[float]]:
    """Factors that turn index differences of a norm-frame displacement into derivatives.

    Returns ``(component factors (d,), per-axis factors)``: ``d u_c / d x_j = diff_j(u_c) * comp[c] *
    axis[j]``. Without spacing, derivatives are taken in the norm frame (d norm / d norm, so the
    identity map has Jacobian I); with ``spacing`` (x, y[, z] order, as :class:`coords.Geometry`),
    in physical units (mm / mm).
    """
    if disp.dim() not in (4, 5) or disp.shape[1] != disp.dim() - 2:
        raise ValueError(f"expected a displacement (B, d, *spatial) with d = 2 or 3 spatial dims, "
                         f"got {tuple(disp.shape)}")
    shape = disp.shape[2:]
    d = len(shape)
    if spacing is None:
        return disp.new_ones(d), [float(max(n - 1, 1)) for n in shape]
    if len(spacing) != d:
        raise ValueError(f"spacing needs {d} values (x, y[, z]) for a {d}D displacement, got {spacing}")
    sp = [float(s) for s in reversed(spacing)]  # array order
    return disp.new_tensor([max(n - 1, 1) * s for n, s in zip(shape, sp)]), [1.0 / s for s in sp]


def diffusion(disp: torch.Tensor, spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Diffusion regulariser of a displacement ``(B, d, *S)`` (= map - identity), norm frame.

    Mean squared first derivative, averaged over components and axes as voxelmorph's ``Grad('l2')``
    (``mean_x |grad u|_F^2 / d^2``). 0 for any translation. See :func:`_scales` for ``spacing``.
    """
    comp, axis = _scales(disp, spacing)
    d = disp.shape[1]
    terms = tuple(((2 + j,), axis[j] ** 2 / d) for j in range(d))
    return _DiffEnergy.apply(disp, terms, comp.square())


def bending(disp: torch.Tensor, spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Bending energy of a displacement (or map) ``(B, d, *S)``, norm frame.

    ``sum_ij mean((d_i d_j u)^2)`` over all second derivatives, each mixed one counted twice as in
    MONAI's ``BendingEnergyLoss``; mixed derivatives use the compact 2x2 stencil. 0 for any affine
    map. See :func:`_scales` for ``spacing``.
    """
    comp, axis = _scales(disp, spacing)
    d = disp.shape[1]
    terms = tuple(((2 + j, 2 + i), (1 if i == j else 2) * (axis[i] * axis[j]) ** 2)
                  for i in range(d) for j in range(i, d))
    return _DiffEnergy.apply(disp, terms, comp.square())


def edge_aware_smoothness(disp_vox: torch.Tensor, image: torch.Tensor, edge: float = 1.0) -> torch.Tensor:
    """RAN's edge-aware smoothness (Zheng et al., Eq. 13): ``mean |grad u|^2 exp(-edge |grad I|^2)``.

    ``disp_vox`` ``(B, d, *S)`` in voxels (so its gradient is unitless), ``image`` ``(B, 1, *S)``
    (the fixed image, in [0, 1]); forward differences, the weight per axis from the image's
    difference along that axis. Averaged over components and axes (as :func:`diffusion`); with
    ``edge = 0`` it is the plain diffusion of a voxel displacement. 0 for any translation."""
    d = disp_vox.shape[1]
    if image.shape[0] != disp_vox.shape[0] or image.shape[2:] != disp_vox.shape[2:]:
        raise ValueError(f"edge_aware_smoothness: displacement {tuple(disp_vox.shape)} and image "
                         f"{tuple(image.shape)} must share batch and grid")
    total = disp_vox.new_zeros(())
    for axis in range(2, 2 + d):
        du = disp_vox.diff(dim=axis)
        weight = torch.exp(-edge * image.diff(dim=axis).square().sum(1, keepdim=True))
        total = total + (du.square() * weight).mean()
    return total / d ** 2


def gradicon(phi_ab: torch.Tensor, phi_ba: torch.Tensor) -> torch.Tensor:
    """GradICON inverse-consistency loss (Tian et al., CVPR 2023) of two norm-frame maps.

    ``phi_ab o phi_ba`` is evaluated on ``phi_ba``'s grid (:func:`coords.compose`) and its Jacobian
    ``J`` taken by forward differences scaled by ``(S_j - 1)`` (so the identity has ``J = I``); the
    loss is ``sum_j mean((J e_j - e_j)^2)``, the normalisation of ICON's ``GradientICON``
    (= ``mean_x |J - I|_F^2 / d``) so published lambdas carry over. ICON evaluates at randomly
    jittered grid points; here the grid itself is used, so the loss is deterministic.
    0 when ``phi_ab`` inverts ``phi_ba``, however much they deform.
    """
    if phi_ab.dim() != phi_ba.dim() or phi_ab.shape[:2] != phi_ba.shape[:2]:
        raise ValueError(f"gradicon: maps must be (B, d, *spatial) of the same B and d, "
                         f"got {tuple(phi_ab.shape)} and {tuple(phi_ba.shape)}")
    shape = tuple(phi_ba.shape[2:])
    error = coords.compose(phi_ab, phi_ba) - coords.identity_map(shape, phi_ba.device, phi_ba.dtype)
    # J - I is the Jacobian of ``error``; diffusion() averages its squares over the d directions too
    return len(shape) * diffusion(error)
