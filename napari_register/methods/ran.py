"""RAN, the Residual Aligner Network (Zheng et al., "Residual Aligner Network"), 2D and 3D.

The authors' TensorFlow code (jianqingzheng/res_aligner_net) was read to understand, not copied.
Choices taken where the paper and their code leave room, or where we differ:

- **Feature extractor**, one network for both images (Siamese). Encoder: residual blocks of three
  3^d convolutions (dilations 1, 1, 3), instance norm, LeakyReLU 0.2, at widths ``widths`` (default
  8, 8, 16, 32) on the full, 1/2, 1/4 and 1/8 grids, 2x average pooling between.
- **Decoder**, coarse to fine, one level per encoder level (natural grids 1/8, 1/4, 1/2, full): a
  level concatenates the previous level's features with the encoder shortcut of its natural grid.
  *Motion-aware pattern*: the first ``q`` levels (``q`` <= 3) work on the 1/2 grid instead, their
  shortcuts upsampled there, and their convolutions' dilations multiplied by the pool they skipped
  (4, 2 for q = 3), so the receptive field is the pyramid's. ``q = 0`` is the plain pyramid (RAn0).
- **Residual Aligner modules**: one per decoder level (four; the authors use five). Each warps the
  source features by the field so far, and a regressor (two dilated 3^d convs, dilation the skipped
  pool x 2 on half-grid levels: 8, 4, 2 for q = 3, then 1) on ``[target, warped source]`` predicts
  an ``m``-head residual displacement (``m * d`` channels) and ``m`` attribute maps. Weights are
  *not* shared across modules (their widths differ per level).
- **Accumulator** (the paper's Eq. 11-12, with its C2 folded into C4): head masks
  ``softmax(theta_k)``, ``theta_k = C3([attr_k, theta_{k-1}])``; confidences ``2 sigmoid(C1(.))``
  of the new attributes and of the previous ones; the new field ``phi_k = C4([conf_k * mask_j *
  head_j for j < m, conf_{k-1} * phi_{k-1}, phi_{k-1}])`` where C4 is one 3^d convolution shared
  by the x/y/z components (they are folded into the batch, as in the authors' code). C4 starts as
  ``conf_{k-1} phi_{k-1} + sum_j (...)``, so at initialisation ``phi_k = phi_{k-1} + sum_j
  mask_j head_j``; heads start at zero, so an untrained network is the identity.
- Displacements are in voxels of the working grid; a level's heads are scaled by its pool, so an
  output of 1 is one voxel of the grid it was predicted on. The map is identity + displacement.

Training (``napari_register.training.recipes.ran``): field-supervised pre-training on synthetic
maps, then NCC + the edge-aware smoothness ``lam * |grad u|^2 exp(-s |grad I_fixed|^2)``. At
inference the affine stage of ``optimize`` runs first (the map is affine o network); instance
optimisation fine-tunes a copy with the training's unsupervised loss.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import coords
from .base import IOObjective, NetworkMethod, isotropic_working_shape
from .blocks import conv_cls
from .registry import register_method

TRAIN_SHAPE = {2: (160, 160), 3: (32, 40, 32)}  # 3D: random crops (64 x 80 x 64 mm of a brain)
# The working grid's voxel budget: brains at 2 mm (the training scale), 2D images as CARL's.
WORKING_VOXELS = {2: 160 * 160, 3: 80 * 96 * 72}
MULTIPLE = 8  # three 2x poolings
LNCC_WINDOW = {2: 9, 3: 7}
LAM, EDGE = 1.0, 1.0  # smoothness weight and edge sharpness s (the paper's Eq. 13: s = 1)


def _mode(dim: int) -> str:
    return "bilinear" if dim == 2 else "trilinear"


def _resize(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=shape, mode=_mode(x.dim() - 2), align_corners=True)


class ResBlock(nn.Module):
    """Three 3^d convs (dilations ``dilations`` x ``scale``) with instance norm and LeakyReLU 0.2,
    plus a 1x1 shortcut when the width changes."""

    def __init__(self, dim: int, cin: int, cout: int, scale: int = 1, dilations: tuple[int, ...] = (1, 1, 3)) -> None:
        super().__init__()
        conv = conv_cls(dim)
        norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
        layers: list[nn.Module] = []
        ch = cin
        for i, dil in enumerate(dilations):
            r = dil * scale
            layers += [conv(ch, cout, 3, padding=r, dilation=r), norm(cout, affine=True)]
            if i < len(dilations) - 1:
                layers.append(nn.LeakyReLU(0.2))
            ch = cout
        self.body = nn.Sequential(*layers)
        self.skip = nn.Identity() if cin == cout else conv(cin, cout, 1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResidualAligner(nn.Module):
    """One RA module on one grid: regressor (m-head residual field + attributes) and accumulator."""

    def __init__(self, dim: int, channels: int, heads: int, dilation: int, pool: int, hidden: int = 8) -> None:
        super().__init__()
        conv = conv_cls(dim)
        self.dim, self.heads, self.pool = dim, heads, pool
        self.regress = nn.Sequential(
            conv(2 * channels, hidden, 3, padding=dilation, dilation=dilation), nn.LeakyReLU(0.2),
            conv(hidden, hidden, 3, padding=max(dilation // 2, 1), dilation=max(dilation // 2, 1)), nn.LeakyReLU(0.2))
        self.field = conv(hidden, dim * heads, 3, padding=1)
        self.attr = conv(hidden, heads, 3, padding=1)
        nn.init.zeros_(self.field.weight)
        nn.init.zeros_(self.field.bias)
        self.conf = conv(heads, 1, 3, padding=1)             # C1, shared by new and previous attributes
        self.attr_fuse = conv(2 * heads, heads, 3, padding=1)  # C3
        self.fuse = conv(heads + 2, 1, 3, padding=1, bias=False)  # C4, shared by the components
        with torch.no_grad():
            nn.init.zeros_(self.conf.weight)
            nn.init.zeros_(self.conf.bias)
            self.fuse.weight.zero_()
            centre = (0, slice(None), *([1] * dim))
            self.fuse.weight[centre] = torch.tensor([1.0] * heads + [1.0, 0.0])

    def forward(self, f_src: torch.Tensor, f_tgt: torch.Tensor, disp: torch.Tensor,
                theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``disp`` (B, d, *S) in working-grid voxels and ``theta`` (B, m, *S) on this module's grid ->
        the refined ``(disp, theta)``."""
        b, d, m = f_src.shape[0], self.dim, self.heads
        shape = tuple(f_src.shape[2:])
        full = [int(n) * self.pool for n in shape]  # the working grid's sizes (approximately)
        per_axis = disp.new_tensor([1.0 / max(n - 1, 1) for n in full]).view(1, d, *([1] * d))
        warped = coords.sample(f_src, coords.identity_map(shape, disp.device, disp.dtype) + disp * per_axis)
        hidden = self.regress(torch.cat([f_tgt, warped], 1))
        heads = self.field(hidden).view(b, d, m, *shape) * self.pool
        attr = self.attr(hidden)
        theta_new = self.attr_fuse(torch.cat([attr, theta], 1))
        mask = torch.softmax(theta_new, 1)
        conf_new = 2 * torch.sigmoid(self.conf(attr))
        conf_old = 2 * torch.sigmoid(self.conf(theta))
        weighted = heads * (mask * conf_new)[:, None]               # (B, d, m, *S)
        stack = torch.cat([weighted, (disp * conf_old)[:, :, None], disp[:, :, None]], 2)
        fused = self.fuse(stack.reshape(b * d, m + 2, *shape)).view(b, d, *shape)
        return fused, theta_new


class RANNet(nn.Module):
    """The Residual Aligner Network; ``forward(moving, fixed)`` on ``(B, 1, *S)`` -> map ``(B, d, *S)``
    (sizes divisible by 8)."""

    def __init__(self, dim: int, widths: tuple[int, ...] = (8, 8, 16, 32), heads: int = 6, q: int = 3,
                 hidden: int = 8) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"RAN needs four encoder widths (full, 1/2, 1/4, 1/8 grids), got {widths}")
        if not 0 <= q <= 3:
            raise ValueError(f"q (motion-aware decoder levels) must be 0..3, got {q}")
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.dim, self.q, self.heads = dim, q, heads
        self.encoder = nn.ModuleList([ResBlock(dim, cin, cout) for cin, cout in zip((1, *widths[:-1]), widths)])
        # decoder level k (0..3) has natural pool 8, 4, 2, 1; motion-aware levels (k < q) sit at pool 2
        self.pools = [min(2 ** (3 - k), 2) if k < q else 2 ** (3 - k) for k in range(4)]
        skipped = [2 ** (3 - k) // p for k, p in enumerate(self.pools)]
        dec_widths = list(reversed(widths))
        self.decoder = nn.ModuleList()
        for k in range(4):
            cin = dec_widths[k] + (dec_widths[k - 1] if k else 0)
            self.decoder.append(ResBlock(dim, cin, dec_widths[k], scale=skipped[k]))
        self.aligners = nn.ModuleList([
            ResidualAligner(dim, dec_widths[k], heads, 2 * skipped[k] if self.pools[k] > 1 else 1, self.pools[k], hidden)
            for k in range(4)])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's features per level, each on its level's grid."""
        pool = F.avg_pool3d if self.dim == 3 else F.avg_pool2d
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else pool(x, 2))
            skips.append(x)
        full = tuple(skips[0].shape[2:])
        out, prev = [], None
        for k, block in enumerate(self.decoder):
            grid = tuple(n // self.pools[k] for n in full)
            parts = [_resize(skips[3 - k], grid)] + ([] if prev is None else [_resize(prev, grid)])
            prev = block(torch.cat(parts, 1))
            out.append(prev)
        return out

    def displacement(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``(B, d, *S)`` displacement in voxels of the input grid."""
        shape = tuple(fixed.shape[2:])
        if moving.shape != fixed.shape or len(shape) != self.dim or any(n % MULTIPLE for n in shape):
            raise ValueError(f"RAN {self.dim}D needs moving and fixed of one shape (B, 1, *S) with sizes divisible "
                             f"by {MULTIPLE}, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        both = self.features(torch.cat([moving, fixed], 0))  # Siamese: one pass for both images
        b = moving.shape[0]
        disp = theta = None
        for k, aligner in enumerate(self.aligners):
            f_src, f_tgt = both[k][:b], both[k][b:]
            grid = tuple(f_src.shape[2:])
            if disp is None:
                disp = f_src.new_zeros(b, self.dim, *grid)
                theta = f_src.new_zeros(b, self.heads, *grid)
            else:
                disp, theta = _resize(disp, grid), _resize(theta, grid)
            disp, theta = aligner(f_src, f_tgt, disp, theta)
        return _resize(disp, shape)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        disp = self.displacement(moving, fixed)
        return map_from_voxels(disp)


def map_from_voxels(disp: torch.Tensor) -> torch.Tensor:
    """Norm-frame map of a displacement in voxels of its own grid."""
    shape = tuple(disp.shape[2:])
    d = len(shape)
    per_axis = disp.new_tensor([1.0 / max(n - 1, 1) for n in shape]).view(1, d, *([1] * d))
    return coords.identity_map(shape, disp.device, disp.dtype) + disp * per_axis


def voxels_from_map(phi: torch.Tensor) -> torch.Tensor:
    """Displacement in voxels of a norm-frame map's grid (inverse of :func:`map_from_voxels`)."""
    shape = tuple(phi.shape[2:])
    d = len(shape)
    per_axis = phi.new_tensor([max(n - 1, 1) for n in shape]).view(1, d, *([1] * d))
    return (phi - coords.identity_map(shape, phi.device, phi.dtype)) * per_axis


def build(**config: Any) -> RANNet:
    """``RANNet(**config)``; ``config`` is what checkpoints store (``dim`` included)."""
    config = dict(config)
    for key in ("widths",):
        if key in config:
            config[key] = tuple(config[key])
    return RANNet(**config)


def unsupervised_loss(net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, lam: float = LAM,
                      edge: float = EDGE, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """NCC of the warped moving image plus the edge-aware smoothness; ``(loss, map, logs)``."""
    from ..losses import edge_aware_smoothness, lncc

    phi = net(moving, fixed)
    dim = moving.dim() - 2
    sim = lncc(coords.sample(moving, phi), fixed, LNCC_WINDOW[dim] if window is None else window)
    smooth = edge_aware_smoothness(voxels_from_map(phi), fixed, edge)
    return sim + lam * smooth, phi, {"sim": float(sim.detach()), "smooth": float(smooth.detach())}


@register_method("ran")
class RAN(NetworkMethod):
    """Registered method: the Residual Aligner Network, optionally with instance optimisation."""

    dims = (2, 3)
    default_io_steps = 50
    default_io_steps_cpu = 0  # the network alone on the CPU unless IO is asked for
    network_seconds = {2: 4e-6, 3: 2.5e-6}
    io_seconds = {2: 1.2e-5, 3: 1e-5}
    description = "RAN: residual aligner network, multi-head fields fused by confidence (Zheng et al.)"
    io_lr = 1e-4  # chosen on prostate_val pairs (docs/methods/ran.md): 3e-4 lowered Dice
    io_lr_decay = 0.3
    io_preview_every = 5
    build = staticmethod(build)

    def __init__(self, dim: int, device: torch.device, checkpoint: str | Path | None = None, *,
                 affine_iterations: int = 200, io_lr: float | None = None, io_lr_end: float | None = None,
                 io_lam: float | None = None, voxels: int | None = None) -> None:
        super().__init__(dim, device, checkpoint, affine_iterations=affine_iterations, io_lr=io_lr,
                         io_lr_end=io_lr_end)
        self.io_lam = io_lam
        self.voxels = WORKING_VOXELS[dim] if voxels is None else int(voxels)
        if self.voxels < MULTIPLE ** dim:
            raise ValueError(f"voxels must be at least {MULTIPLE ** dim}, got {voxels}")

    def working_shape(self, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
        return isotropic_working_shape(shape, spacing_xyz, self.voxels, MULTIPLE)

    def memory_bytes(self, shape: tuple[int, ...], io_steps: int) -> int:
        voxels = math.prod(shape)
        return int((900 if io_steps > 0 else 250) * voxels + 100e6)

    def io_objective(self, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> IOObjective:
        train = self.train_card
        lam = float(train.get("lam", LAM) if self.io_lam is None else self.io_lam)
        edge = float(train.get("edge", EDGE))

        def objective() -> tuple[torch.Tensor, torch.Tensor]:
            loss, phi, _ = unsupervised_loss(net, moving, fixed, lam, edge)
            return loss, phi.detach()

        return objective
