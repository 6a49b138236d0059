"""Shared network blocks for registration methods (CARL, RAN, ART, AltO, baselines).

A *registration net* is an ``nn.Module`` whose ``forward(moving, fixed)`` takes two ``(B, C, *S)``
images on the same grid and returns a map ``(B, d, *S)`` in the norm frame of :mod:`coords`
(fixed -> moving). Nets compose like ICON's: ``TwoStep(Down(TwoStep(Down(xi), psi1)), psi2)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import coords


def conv_cls(dim: int) -> type[nn.Module]:
    if dim not in (2, 3):
        raise ValueError(f"networks handle 2D or 3D images, not {dim}D")
    return nn.Conv3d if dim == 3 else nn.Conv2d


class ConvEncoder(nn.Module):
    """Single-resolution feature encoder: ``(B, C_in, *S) -> (B, out_ch, *S)``.

    Every conv is unpadded ("valid") and no layer strides, so the input is zero-padded once by the
    receptive radius and the output comes back on the input grid: shifting the input by an integer
    number of voxels shifts the output by exactly the same amount (away from content at the border).
    """

    def __init__(self, dim: int, in_ch: int = 1, width: int = 16, dilations: tuple[int, ...] = (1, 2, 4, 2, 1),
                 out_ch: int = 32) -> None:
        super().__init__()
        conv = conv_cls(dim)
        layers: list[nn.Module] = []
        ch = in_ch
        for dil in dilations:
            layers += [conv(ch, width, 3, dilation=dil), nn.LeakyReLU(0.2)]
            ch = width
        layers.append(conv(ch, out_ch, 1))
        self.net = nn.Sequential(*layers)
        # Variance-preserving init: with torch's default the features shrink ~2x per layer and the
        # attention starts uniform (every fixed voxel maps to the moving image's centre of mass).
        for m in self.net:
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        self.radius = sum(dilations)  # each 3-wide conv of dilation r eats r voxels per side
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.radius
        return self.net(F.pad(x, [r, r] * self.dim))


class CoordAttention(nn.Module):
    """CARL's Xi: features of both images, then attention with fixed features as queries, moving
    features as keys and the moving voxels' norm coordinates as values.

    Each fixed voxel's output is the attention-weighted centre of mass of the moving voxels that
    look like it, i.e. where it lands in the moving image. Returns a map ``(B, d, *S)``.
    Features are unit vectors per voxel and the logits ``scale * cosine`` (the reference
    implementation uses 16): with raw dot products the keys of largest norm win every query and
    the map collapses to a point; with cosines a voxel matches itself best.
    """

    def __init__(self, encoder: nn.Module, scale: float = 16.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = float(scale)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        b, _, *shape = fixed.shape
        d = len(shape)
        q = F.normalize(self.encoder(fixed).flatten(2).transpose(1, 2), dim=-1)   # (B, N, C)
        k = F.normalize(self.encoder(moving).flatten(2).transpose(1, 2), dim=-1)  # (B, N, C)
        v = coords.identity_map(tuple(shape), fixed.device, q.dtype).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v.expand(b, -1, -1)[:, None],
                                             scale=self.scale)
        return out[:, 0].transpose(1, 2).reshape(b, d, *shape)


class UNet(nn.Module):
    """Small U-Net: ``(B, in_ch, *S) -> (B, out_ch, *S)``; any size (upsampling matches the skips)."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, channels: tuple[int, ...] = (16, 32, 32, 32)) -> None:
        super().__init__()
        conv = conv_cls(dim)
        self.dim = dim
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        ch, skips = in_ch, []
        for c in channels:
            self.down.append(nn.Sequential(conv(ch, c, 3, padding=1), nn.LeakyReLU(0.2),
                                           conv(c, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2)))
            skips.append(ch)
            ch = c
        for c_skip, c in zip(reversed(skips), reversed(channels)):
            self.up.append(nn.Sequential(conv(ch + c_skip, c, 3, padding=1), nn.LeakyReLU(0.2)))
            ch = c
        self.head = conv(ch, out_ch, 3, padding=1)
        self.levels = len(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.down:
            skips.append(x)
            x = layer(x)
        mode = "bilinear" if self.dim == 2 else "trilinear"
        for layer, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=False)
            x = layer(torch.cat([x, skip], 1))
        return self.head(x)


class DisplacementNet(nn.Module):
    """Registration net predicting a displacement: ``map = identity + UNet([moving, fixed])``.

    The head starts at zero so an untrained refinement step is the identity. ``ref_shape``: the grid
    whose norm units the head learned (its training grid). Convolutions see voxels, so a net that
    learned "move 2 voxels" must move 2 voxels on any grid: on an ``n``-voxel axis the output is
    scaled by ``(ref - 1) / (n - 1)``. Without it the step is a fixed fraction of the field of view,
    too long on a finer grid (1.5x on the OASIS working grid for a net trained at 48x56x48).
    """

    def __init__(self, dim: int, channels: tuple[int, ...] = (16, 32, 32, 32),
                 ref_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.unet = UNet(dim, 2, dim, channels)
        nn.init.zeros_(self.unet.head.weight)
        nn.init.zeros_(self.unet.head.bias)
        if ref_shape is not None and len(ref_shape) != dim:
            raise ValueError(f"ref_shape must have {dim} sizes, got {ref_shape}")
        self.ref_shape = None if ref_shape is None else tuple(int(r) for r in ref_shape)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        shape = tuple(fixed.shape[2:])
        disp = self.unet(torch.cat([moving, fixed], 1))
        if self.ref_shape is not None and self.ref_shape != shape:
            scale = fixed.new_tensor([(r - 1) / max(n - 1, 1) for r, n in zip(self.ref_shape, shape)])
            disp = disp * scale.view(1, -1, *([1] * len(shape)))
        return coords.identity_map(shape, fixed.device, fixed.dtype) + disp


class TwoStep(nn.Module):
    """``first`` registers the pair, ``second`` registers the warped moving image to the fixed one;
    the result is ``first o second`` (a fixed point goes through ``second`` then ``first``)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        phi1 = self.first(moving, fixed)
        phi2 = self.second(coords.sample(moving, phi1), fixed)
        return coords.compose(phi1, phi2)


class Symmetrised(nn.Module):
    """``net`` run both ways and its map symmetrised (:func:`coords.symmetrise`): the mean of
    ``net(moving, fixed)`` and the inverse of ``net(fixed, moving)``, to first order."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return coords.symmetrise(self.net(moving, fixed), self.net(fixed, moving))


def half_resolution(image: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S) -> (B, C, *S/2)``: [1, 2, 1]/4 blur per axis, then resampling that keeps the corner
    voxel centres, so the norm frame is unchanged (a plain 2x average pool would shift it by a
    quarter voxel at the borders; an even box filter shifts it by half a voxel everywhere)."""
    d = image.dim() - 2
    c = image.shape[1]
    out = image
    for axis in range(d):
        shape = [1] * d
        shape[axis] = 3
        kernel = image.new_tensor([0.25, 0.5, 0.25]).view(1, 1, *shape).expand(c, 1, *shape)
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = 1  # F.pad counts from the last axis
        out = (F.conv3d if d == 3 else F.conv2d)(F.pad(out, pad, mode="replicate"), kernel, groups=c)
    half = tuple(s // 2 for s in image.shape[2:])
    return F.interpolate(out, size=half, mode="bilinear" if d == 2 else "trilinear", align_corners=True)


class Down(nn.Module):
    """Run ``inner`` on images at half resolution (:func:`half_resolution`) and bring its map back
    to the input grid; the norm frame is the same at both resolutions so the map needs no rescaling."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        shape = tuple(fixed.shape[2:])
        if any(s % 2 for s in shape):
            raise ValueError(f"Down needs even sizes, got {shape}; choose a working shape divisible by 4")
        phi = self.inner(half_resolution(moving), half_resolution(fixed))
        return coords.resize_map(phi, shape)


def svf_exp(velocity: torch.Tensor, steps: int | None = None, max_gradient: float = 0.25) -> torch.Tensor:
    """Map ``exp(v)`` of a velocity ``(B, d, *S)`` in norm units by scaling and squaring.

    ``steps=None`` picks the fewest squarings that bring the scaled velocity's largest voxel-to-voxel
    change under ``max_gradient``: at 0.25 the first Euler step cannot fold, and squaring keeps it
    so. A smooth velocity needs few squarings even for a large motion (each one resamples the field,
    the bulk of an iteration's cost)."""
    shape = tuple(velocity.shape[2:])
    ident = coords.identity_map(shape, velocity.device, velocity.dtype)
    if steps is None:
        d = len(shape)
        with torch.no_grad():
            scale = torch.tensor([max(n - 1, 1) for n in shape], device=velocity.device, dtype=velocity.dtype)
            vox = velocity * scale.view(1, d, *([1] * d))  # voxel units
            grad = max((float(vox.diff(dim=2 + a).abs().max()) for a in range(d) if shape[a] > 1), default=0.0)
        steps = int(min(max(math.ceil(math.log2(max(grad, 1e-6) / max_gradient)), 1), 8))
    phi = ident + velocity / (2 ** steps)
    for _ in range(steps):
        phi = coords.compose(phi, phi)
    return phi
