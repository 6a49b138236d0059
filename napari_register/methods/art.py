"""ART (Auto-Regressive Transformation for image alignment, arXiv 2505.04864), 2D.

The transform is two dense fields on the fixed image's grid, multiplicative ``D_M`` (identity:
ones) and additive ``D_A`` (identity: zeros), acting per pixel on centred coordinates
``c = 2 norm - 1`` (array order: row, col): ``c' = D_M * c + D_A`` is where fixed pixel ``c``
lands in the moving image (our ``moving_from_fixed``). They start at 12 x 12 and are refined
auto-regressively over ``K`` steps, doubling the resolution each step (``12 * 2^K = size``).
Each step upsamples the fields, samples the moving image's features at the current map (the
"source" features, on the fixed grid), runs a cross-attention layer with those as queries and the
fixed ("destination") features as keys and values, ``F = concat(F_s, F_d, CAL(F_s, F_d))``, and
updates ``D`` by a small conv net on ``concat(D, F)``.

Choices the paper leaves open, as built here:
- The frame: centred norm coordinates of the working grid, per axis; the update is additive to both
  fields (``D += u``), its last conv zero-initialised.
- The attention's logits are cosines times a fixed scale (``attention_scale``), and its values
  carry the destination pixel's centred coordinates besides its features (as CARL's coordinate
  attention does), so the layer reports *where* a source feature is found, not only what is there. Attention runs on at most ``attention_grid``^2 tokens (the
  finest steps attend on an average-pooled grid and upsample the result): global attention on
  96^2 tokens does not fit a CPU.
- The update is antisymmetric, ``u = h(D, F_s, F_d) - h(D, F_d, F_s)`` (bounded by a tanh), plus a
  direct path from the attention: half the difference between where the fixed content is found
  in the warped moving image and where the warped moving content is found in the fixed image (the
  shift still to apply, times a learned gate per step). Both vanish for identical inputs, so
  ``D_M = 1, D_A = 0`` from the first step, for any weights.
- Homography term: L1 (px) between the final map and the homography fitted to it by least
  squares (DLT over a grid of points), weight ``lam_h``; the point term: L2 (px) on ``points``
  random points per step against the ground-truth map, later steps weighted more (``gamma``).
- Beyond the paper's loss, the recipe adds a cross-entropy on each step's attention against where
  each fixed pixel's content truly is (:func:`attention_loss`), and trains the attention alone
  first: without it the network did not move from the identity on the CPU (docs/methods/art.md).
- Output: the dense map and the homography fitted to it; by default (``fit_steps``) that
  homography is then refined on the pair by its four corners (LNCC, coarse to fine,
  :func:`napari_register.instance_opt.iter_corner_fit`) and becomes the result.
- Attention one feature level coarser than the step's grid (the first step attends at 12 x 12,
  where the fields start): a token then sees twice the context, and global matching learns several
  times faster on the CPU (docs/methods/art.md).
- Backbone: a small residual CNN (one stride-2 conv and one residual block per level, widths
  ``widths`` from fine to coarse) instead of a ResNet-18, for CPU training.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import coords
from .base import IOObjective, NetworkMethod
from .registry import MethodOutput, register_method

START = 12  # side of the first fields


class _Res(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.b(F.leaky_relu(self.a(x), 0.2)), 0.2)


class Backbone(nn.Module):
    """``(B, 1, S, S)`` -> features at S, S/2, S/4, ... (``len(widths)`` levels, fine to coarse)."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.levels = nn.ModuleList()
        ch = 1
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            self.levels.append(nn.Sequential(nn.Conv2d(ch, w, 3, stride=stride, padding=1), nn.LeakyReLU(0.2), _Res(w)))
            ch = w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for level in self.levels:
            x = level(x)
            out.append(x)
        return out


class CrossAttention(nn.Module):
    """Queries from ``f_s``, keys and values from ``f_d`` (plus its centred coordinates), on at most
    ``grid``^2 tokens; ``(B, C, H, W) x 2 -> (B, out, H, W)``."""

    def __init__(self, ch: int, dim: int, out: int, grid: int, scale: float = 16.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.q, self.k, self.v = nn.Conv2d(ch, dim, 1), nn.Conv2d(ch, dim, 1), nn.Conv2d(ch, dim, 1)
        self.out = nn.Conv2d(dim + 2, out, 1)
        self.grid = grid

    def forward(self, f_s: torch.Tensor, f_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features (B, out, H, W), attended centred coordinates (B, 2, H, W), attention weights
        (B, h*w, h*w) on the pooled grid)``."""
        b, _, h, w = f_s.shape
        if max(h, w) > self.grid:
            f_s, f_d = F.adaptive_avg_pool2d(f_s, self.grid), F.adaptive_avg_pool2d(f_d, self.grid)
        hh, ww = f_s.shape[2:]
        pos = 2 * coords.identity_map((hh, ww), f_s.device, f_s.dtype) - 1
        # cosine logits times a fixed scale (as CARL's attention): with raw dot products the random
        # features of a fresh net attend uniformly and the coordinates carry no signal to learn from
        q = F.normalize(self.q(f_s).flatten(2).transpose(1, 2), dim=-1)
        k = F.normalize(self.k(f_d).flatten(2).transpose(1, 2), dim=-1)
        v = torch.cat([self.v(f_d), pos.expand(b, -1, -1, -1)], 1).flatten(2).transpose(1, 2)
        weights = torch.softmax(self.scale * q @ k.transpose(1, 2), -1)
        att = (weights @ v).transpose(1, 2).reshape(b, -1, hh, ww)
        out = torch.cat([self.out(att), att[:, -2:]], 1)
        if (hh, ww) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return out[:, :-2], out[:, -2:], weights


class Updater(nn.Module):
    """``h(D, F_s, F_d, CAL)``: a conv net from the fields and features to a 4-channel update."""

    def __init__(self, ch: int, att: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4 + 2 * ch + att, hidden, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(hidden, 4, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, d: torch.Tensor, f_s: torch.Tensor, f_d: torch.Tensor, cal: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([d, f_s, f_d, cal], 1))


def fields_to_map(d: torch.Tensor) -> torch.Tensor:
    """``(B, 4, H, W)`` fields ``[D_M, D_A]`` -> map ``(B, 2, H, W)`` moving_norm_from_fixed_norm."""
    c = 2 * coords.identity_map(tuple(d.shape[2:]), d.device, d.dtype) - 1
    return (d[:, :2] * c + d[:, 2:] + 1) / 2


class ARTNet(nn.Module):
    """``forward(moving, fixed)`` on ``(B, 1, size, size)`` -> the maps of every step, coarse to fine
    (the last is the result), each ``(B, 2, 12 * 2^k, 12 * 2^k)``; ``fields=True``: the fields
    ``[D_M, D_A]`` ``(B, 4, ...)`` instead. ``found``: a list that receives, per step, the
    attention weights of the fixed pixels over the warped moving image (on the attention's grid)
    and the fields the moving image was warped with."""

    def __init__(self, dim: int = 2, size: int = 96, widths: Sequence[int] = (16, 32, 64, 128),
                 attention_dim: int = 64, attention_out: int = 32, attention_grid: int = 24, hidden: int = 32,
                 cross_attention: bool = True, attention_scale: float = 32.0) -> None:
        super().__init__()
        if dim != 2:
            raise ValueError(f"ART registers 2D images, not {dim}D")
        steps = math.log2(size / START)
        if steps != int(steps) or steps < 1:
            raise ValueError(f"ART's size must be 12 * 2^K (24, 48, 96, 192, ...), got {size}")
        self.dim, self.size, self.steps = dim, int(size), int(steps)
        if len(widths) < self.steps + 1:
            raise ValueError(f"size {size} takes {self.steps} steps, which need {self.steps + 1} feature levels; "
                             f"got widths {list(widths)}")
        self.backbone = Backbone(widths)
        self.cross_attention = bool(cross_attention)
        # step k (1..K) works at size / 2^(K-k): feature level K-k (0 = finest); its attention one
        # level coarser (the first at 12 x 12, where the fields start): twice the context per token
        levels = [self.steps - k for k in range(1, self.steps + 1)]
        self.attention = nn.ModuleList(
            CrossAttention(widths[lv + 1], attention_dim, attention_out, attention_grid, attention_scale)
            for lv in levels) if cross_attention else None
        self.gate = nn.Parameter(torch.ones(self.steps)) if cross_attention else None
        self.update = nn.ModuleList(Updater(widths[lv], attention_out if cross_attention else 0, hidden)
                                    for lv in levels)
        self.levels = levels

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, fields: bool = False,
                found: list | None = None) -> list[torch.Tensor]:
        if moving.shape != fixed.shape or moving.dim() != 4 or tuple(fixed.shape[2:]) != (self.size, self.size):
            raise ValueError(f"ART needs moving and fixed of shape (B, 1, {self.size}, {self.size}), "
                             f"got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        feats_m, feats_f = self.backbone(moving), self.backbone(fixed)
        b = fixed.shape[0]
        d = torch.cat([fixed.new_ones(b, 2, START, START), fixed.new_zeros(b, 2, START, START)], 1)
        maps = []
        for k, lv in enumerate(self.levels):
            side = START * 2 ** (k + 1)
            d = F.interpolate(d, size=(side, side), mode="bilinear", align_corners=True)
            f_d = feats_f[lv]
            phi = fields_to_map(d)
            f_s = coords.sample(feats_m[lv], phi)  # the moving features where D sends the fixed grid
            u = 0.0
            if self.attention is not None:
                a_d = feats_f[lv + 1]
                a_s = coords.sample(feats_m[lv + 1], coords.resize_map(phi, tuple(a_d.shape[2:])))
                (cal_sd, pos_sd, _), (cal_ds, pos_ds, w_ds) = self.attention[k](a_s, a_d), self.attention[k](a_d, a_s)
                cal_sd, pos_sd, cal_ds, pos_ds = (F.interpolate(t, size=(side, side), mode="bilinear", align_corners=True)
                                                  for t in (cal_sd, pos_sd, cal_ds, pos_ds))
                # where the fixed content is found in the warped moving image, less where the warped
                # moving content is found in the fixed image, halved: the shift still to apply (a
                # direct path, as CARL's attention map, which the learned update corrects)
                shift = 0.5 * (pos_ds - pos_sd)
                if found is not None:  # for the recipe's attention term: where it looked, from which fields
                    found.append((w_ds, d))
                u = self.gate[k] * torch.cat([torch.zeros_like(shift), d[:, :2] * shift], 1)
            else:
                cal_sd = cal_ds = f_d.new_zeros(b, 0, side, side)
            # antisymmetric: identical inputs give exactly no update, whatever the weights
            raw = self.update[k](d, f_s, f_d, cal_sd) - self.update[k](d, f_d, f_s, cal_ds)
            d = d + u + 0.5 * torch.tanh(raw)  # bounded: one step moves a pixel at most a quarter image
            maps.append(d if fields else fields_to_map(d))
        return maps


    def match(self, moving: torch.Tensor, fixed: torch.Tensor) -> list[torch.Tensor]:
        """Each step's attention weights of the fixed image's tokens over the moving image's, the
        fields at the identity (``(B, n*n, n*n)`` per step): what the recipe's attention
        pre-training teaches, without the refinement's cost."""
        if self.attention is None:
            raise ValueError("this ART network has no cross-attention (cross_attention: false)")
        feats_m, feats_f = self.backbone(moving), self.backbone(fixed)
        return [att(feats_f[lv + 1], feats_m[lv + 1])[2] for att, lv in zip(self.attention, self.levels)]


def build(**config: Any) -> ARTNet:
    return ARTNet(**config)


def fit_homography(phi: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """``(B, 3, 3)`` homographies, norm frame (row, col), fitted to maps ``(B, 2, H, W)`` by least
    squares on every ``stride``-th pixel (:func:`coords.fit_homography`)."""
    src = coords.identity_map(tuple(phi.shape[2:]), phi.device, phi.dtype)[:, :, ::stride, ::stride]
    dst = phi[:, :, ::stride, ::stride]
    return coords.fit_homography(src.flatten(2).transpose(1, 2).expand(phi.shape[0], -1, -1),
                                 dst.flatten(2).transpose(1, 2))


def _inside(truth: torch.Tensor, margin: float = 0.25) -> torch.Tensor:
    """Where the true map stays within ``margin`` of the image (norm frame): a homography of the
    central patch can send far pixels of the view towards its horizon, and those targets would
    swamp the loss."""
    return ((truth > -margin) & (truth < 1 + margin)).all(1, keepdim=True).to(truth.dtype)


def point_loss(phi: torch.Tensor, truth: torch.Tensor, points: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared distance (px of ``truth``'s grid) between ``phi`` and ``truth`` at ``points``
    random points of the image (bilinear in both) whose true position is near the image."""
    b = phi.shape[0]
    pts = torch.rand(b, points, 1, 2, generator=gen).to(phi.device)  # grid_sample's (x, y) in [0, 1]
    grid = 2 * pts - 1
    a = F.grid_sample(phi, grid, align_corners=True)[..., 0]
    t = F.grid_sample(truth, grid, align_corners=True)[..., 0]
    w = _inside(t)
    scale = phi.new_tensor([n - 1 for n in truth.shape[2:]]).view(1, 2, 1)
    return ((((a - t) * scale) ** 2).sum(1, keepdim=True) * w).sum() / w.sum().clamp_min(1)


def attention_loss(weights: torch.Tensor, d: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the attention weights ``(B, n*n, n*n)`` (fixed pixels of an ``n x n`` grid
    over the moving image warped by fields ``d``) against where each fixed pixel's content truly is:
    the true position pulled back through ``c' = D_M * c + D_A`` (``(t - D_A) / D_M``, ``D`` taken
    as locally constant), spread bilinearly over its four nearest cells. A classification loss
    teaches the features to match long before a soft-argmax's L2 would (its gradient vanishes
    while the weights are diffuse)."""
    b, nq, nk = weights.shape
    n = int(round(nq ** 0.5))
    grid = (n, n)
    t = coords.resize_map(truth, grid)
    dd = F.interpolate(d, size=grid, mode="bilinear", align_corners=True)
    target = ((2 * t - 1) - dd[:, 2:]) / dd[:, :2].clamp_min(0.1)  # centred, in the warped moving image
    cell = ((target + 1) / 2 * (n - 1)).flatten(2).transpose(1, 2).detach()  # (B, nq, 2) row, col
    lo = cell.floor()
    frac = cell - lo
    dist = weights.new_zeros(b, nq, nk)
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = lo[..., 0] + dr, lo[..., 1] + dc
            wgt = (frac[..., 0] if dr else 1 - frac[..., 0]) * (frac[..., 1] if dc else 1 - frac[..., 1])
            ok = (r >= 0) & (r < n) & (c >= 0) & (c < n)
            idx = (r.clamp(0, n - 1) * n + c.clamp(0, n - 1)).long()
            dist.scatter_add_(2, idx[..., None], (wgt * ok)[..., None])
    mass = dist.sum(-1)
    valid = (mass > 0.5).to(weights.dtype)  # the true position lies on the grid
    ce = -(dist * torch.log(weights.clamp_min(1e-8))).sum(-1) / mass.clamp_min(1e-8)
    return (ce * valid).sum() / valid.sum().clamp_min(1)


def homography_loss(phi: torch.Tensor) -> torch.Tensor:
    """L1 (px) between a map and the homography fitted to it."""
    shape = tuple(phi.shape[2:])
    fitted = coords.matrix_map(fit_homography(phi), shape)
    scale = phi.new_tensor([n - 1 for n in shape]).view(1, 2, 1, 1)
    return ((phi - fitted) * scale).abs().sum(1).mean()


@register_method("art")
class ART(NetworkMethod):
    """Registered method: ART's network gives a dense map and the homography fitted to it; by default
    that homography is refined on the pair by its corners and is the result (``fit_steps=0``: the
    dense map is). Instance optimisation fine-tunes a copy with LNCC plus the homography term."""

    dims = (2,)
    default_io_steps = 0
    description = ("ART: auto-regressive coarse-to-fine alignment of photos and 2D images, cross-attention guided; "
                   "its homography refined on the pair")
    io_lr = 1e-4
    io_preview_every = 5

    def __init__(self, dim: int, device: torch.device, checkpoint: str | Path | None = None, *,
                 affine_iterations: int = 0, io_lr: float | None = None, io_lam_h: float = 0.05,
                 io_window: int = 9, steps: int | None = None, fit_steps: int = 100, fit_similarity: str = "lncc",
                 fit_lr: float = 0.5, fit_blur: float = 8.0) -> None:
        super().__init__(dim, device, checkpoint, affine_iterations=affine_iterations, io_lr=io_lr)
        self.io_lam_h, self.io_window = float(io_lam_h), int(io_window)
        # steps: stop after this many refinements (the step-efficiency experiment); default all
        self.steps = self.net.steps if steps is None else int(steps)
        if not 1 <= self.steps <= self.net.steps:
            raise ValueError(f"steps must be in 1..{self.net.steps} for this checkpoint, got {steps}")
        # fit_steps: refine the fitted homography on the pair by its corners; the result is then it.
        # The defaults won on validation pairs from the training photos (docs/methods/art.md); 0: the
        # network's dense map
        if int(fit_steps) < 0 or fit_lr <= 0 or fit_blur < 0:
            raise ValueError(f"fit_steps must be >= 0, fit_lr > 0 and fit_blur >= 0, got {fit_steps}, {fit_lr}, "
                             f"{fit_blur}")
        from ..losses import get_similarity

        self.fit_steps, self.fit_lr, self.fit_blur = int(fit_steps), float(fit_lr), float(fit_blur)
        self.fit_similarity = get_similarity(fit_similarity)

    build = staticmethod(build)

    def working_shape(self, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
        return (self.net.size, self.net.size)

    def predict(self, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        phi = net(moving, fixed)[self.steps - 1]
        return coords.resize_map(phi, tuple(fixed.shape[2:]))

    def io_objective(self, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> IOObjective:
        from ..losses import lncc

        def objective() -> tuple[torch.Tensor, torch.Tensor]:
            phi = net(moving, fixed)[-1]
            loss = lncc(coords.sample(moving, phi), fixed, self.io_window) + self.io_lam_h * homography_loss(phi)
            return loss, phi.detach()

        return objective

    def iter_run(self, moving: torch.Tensor, fixed: torch.Tensor, io_steps: int,
                 init: MethodOutput | None = None):
        from ..instance_opt import iter_corner_fit

        out = yield from super().iter_run(moving, fixed, io_steps, init)
        m = fit_homography(out.map)[0]
        if self.fit_steps:
            m, loss = yield from iter_corner_fit(moving, fixed, m, self.fit_steps, self.fit_similarity, self.fit_lr,
                                                 self.fit_blur, "art homography fit")
            out = MethodOutput(map=coords.matrix_map(m, tuple(fixed.shape[2:])), matrix=m, loss=loss, state=out.state)
        out.homography = m
        return out
