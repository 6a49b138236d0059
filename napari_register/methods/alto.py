"""AltO (Song et al., "Unsupervised Homography Estimation on Multimodal Image Pair via Alternating
Optimization", arXiv 2411.13036): a 2D homography network trained without ground truth.

Three parts, one module (:class:`AltONet`), so the generic loop saves and resumes them together:

* ``reg`` - the registration network R (:class:`Matcher`): a correlation matcher in IHN's family
  (Siamese features, a cost volume, no regression head): MIND-SSC tokens of both images refined by
  a learned residual head, every fixed token's soft-argmax match among the moving tokens, and the
  homography of the confidence-weighted DLT over the inliers of a RANSAC. It returns the 3x3
  homography; its four corner offsets (:meth:`AltONet.offsets`) are the paper's parameterisation.
  The DHN regressor this replaced never left the identity in CPU training (docs/methods/alto.md);
  the MIND front end makes R modality-independent from its first step, and AltO's geometry phase
  trains the head and the temperature.
* ``enc`` - the encoder E (:class:`Encoder`): ResNet-34's stem *without* the max-pool after the
  first (7x7, stride 2) convolution, then layers 1-2: features ``(B, enc_widths[2], H/4, W/4)``.
  Reduced for the CPU: widths halved (stem/layer 1/layer 2: 32/32/64 instead of 64/64/128) and one
  BasicBlock per layer (ResNet-34: 3 and 4), ``enc_blocks``.
* ``proj`` - the projector P (:class:`Projector`): a layer-3 style stage (stride 2, ``enc_widths[3]``
  = 128 channels, ResNet-34: 256 and 6 blocks; here ``enc_blocks[2]`` = 1), then global average pooling.

Only R runs at inference; E and P exist for training (:mod:`napari_register.training.recipes.alto`)
and travel in the checkpoint so a run can resume.

Homography frames: ``H_px`` is moving px from fixed px on ``(x, y, 1)``, x = column (OpenCV's
order, the photo source's ``truth_matrix``); ``M`` is the same map as moving_norm_from_fixed_norm on
``(row, col, 1)`` in :mod:`napari_register.coords`' norm frame. ``coords.norm_from_px`` and
``coords.px_from_norm`` convert, batched or not.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Generator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import coords
from ..coords import corner_homography, corners_px  # noqa: F401 - AltO's corner parameterisation
from ..progress import Progress
from .base import NetworkMethod
from .registry import MethodOutput, register_method

TRAIN_SIZE = 128  # the AltO / DeepHomography protocol: 128 x 128 pairs
RHO = 32.0  # corner perturbation of that protocol (px)


# ----------------------------------------------------------------------------- homography helpers

def warp(moving: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``moving (B, C, *S)`` sampled through the norm-frame homographies ``m (B, 3, 3)``: the moving
    image on the fixed grid (``coords.sample`` at ``coords.matrix_map``; border padding)."""
    return coords.sample(moving, coords.matrix_map(m, tuple(moving.shape[2:])))


# ----------------------------------------------------------------------------- the networks

def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Matcher(nn.Module):
    """R: ``(moving, fixed) (B, 1, S, S)`` -> ``H_px (B, 3, 3)``, a correlation matcher (IHN's design
    without its iterations) on a modality-independent front end.

    Each image's MIND-SSC descriptor (4 channels in 2D, blurred ``blur`` px first) is averaged over
    ``level`` x ``level`` cells and stacked with its 3 x 3 neighbours: one 36-d token per cell. A
    learned residual head (two 3x3 convs, the second zero at start) refines the tokens; they are
    centred and normalised, every fixed token is correlated with every moving token (``/ tau``,
    learned), and the soft-argmax gives its matching moving position with the peak probability as
    confidence. Mutual best matches enter a RANSAC (``hypotheses`` 4-point fits, inliers within
    ``1.5 level`` px, no gradient), and the homography is the confidence-weighted DLT over the inliers
    of the best one, refitted once on its own inliers: the soft positions carry the gradient to the
    head and ``tau``. The pair gets the identity instead under ``min_inliers`` inliers, or when the
    fit sends a corner towards the horizon or more than half the image away (a mismatch, not a
    registration)."""

    def __init__(self, level: int = 4, width: int = 64, blur: float = 1.0, hypotheses: int = 1000,
                 min_inliers: int = 8) -> None:
        super().__init__()
        self.level, self.blur = int(level), float(blur)
        self.hypotheses, self.min_inliers = int(hypotheses), int(min_inliers)
        c = 4 * 9  # MIND-SSC channels in 2D, times the 3 x 3 neighbourhood
        self.head = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, c, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # the raw descriptors at the start
        nn.init.zeros_(self.head[-1].bias)
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.003)))

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S)`` -> ``(B, 36, S / level, S / level)`` normalised tokens."""
        from ..losses import mind_ssc

        d = F.avg_pool2d(mind_ssc(coords.gaussian_blur(image, self.blur)), self.level)
        b, _, h, w = d.shape
        t = F.unfold(d, 3, padding=1).view(b, -1, h, w)
        t = t + self.head(t)
        return F.normalize(t - t.mean(1, keepdim=True), dim=1)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        tm, tf = self.tokens(moving), self.tokens(fixed)
        b, _, h, w = tf.shape
        rows, cols = torch.meshgrid(torch.arange(h, dtype=tf.dtype), torch.arange(w, dtype=tf.dtype), indexing="ij")
        centres = (torch.stack([cols, rows], -1).view(-1, 2) * self.level + (self.level - 1) / 2).to(tf.device)
        sim = tf.flatten(2).transpose(1, 2) @ tm.flatten(2) / self.log_tau.exp()  # (B, fixed, moving)
        prob = sim.softmax(-1)
        dst = prob @ centres  # (B, N, 2) moving px (x, y)
        conf = prob.amax(-1)
        with torch.no_grad():
            best = sim.argmax(-1)
            mutual = sim.argmax(1).gather(1, best) == torch.arange(h * w, device=tf.device)
        src = centres[None].expand(b, -1, -1)
        tol = 1.5 * self.level
        with torch.no_grad():
            score = torch.where(mutual, conf, torch.full_like(conf, -1.0))
            inl = _inliers(_ransac(src, dst, score, tol, self.hypotheses), src, dst, mutual, tol)
        hom = coords.fit_homography(src, dst, conf * inl + 1e-6)  # + 1e-6: well-posed without inliers
        with torch.no_grad():  # refit once on the inliers of the fit itself
            inl = _inliers(hom, src, dst, mutual, tol)
        hom = coords.fit_homography(src, dst, conf * inl + 1e-6)  # + 1e-6: well-posed without inliers
        ok = (inl.sum(-1) >= self.min_inliers) & torch.isfinite(hom).all(-1).all(-1)
        with torch.no_grad():  # a fit that sends a corner to the horizon or half an image away is a mismatch
            side = float(h * self.level)
            corners = corners_px((h * self.level, w * self.level)).to(hom.device, hom.dtype)
            finite = torch.nan_to_num(hom)
            denom = finite[:, 2, :2] @ corners.T + finite[:, 2, 2:]  # (B, 4): the perspective divisor at the corners
            moved = (coords.map_points(finite, corners) - corners).norm(dim=-1)
            ok &= (denom > 0.1).all(-1) & (moved < side / 2).all(-1)
        eye = torch.eye(3, dtype=hom.dtype, device=hom.device).expand_as(hom)
        return torch.where(ok[:, None, None], torch.nan_to_num(hom), eye)


def _inliers(hom: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, valid: torch.Tensor, tol: float) -> torch.Tensor:
    """``(..., N)`` points whose ``hom``-mapped ``src`` lies within ``tol`` px of ``dst`` (and ``valid``)."""
    err = (coords.map_points(hom, src) - dst.to(hom.dtype)).norm(dim=-1)
    return (err < tol) & valid


@torch.no_grad()
def _ransac(src: torch.Tensor, dst: torch.Tensor, score: torch.Tensor, tol: float, hypotheses: int,
            keep: int = 256) -> torch.Tensor:
    """The best ``(B, 3, 3)`` of ``hypotheses`` homographies fitted to 4 random matches among the
    ``keep`` best-scoring ones of each pair (``score`` < 0: not a candidate), by inlier count among
    them; a fixed seed, so the method is deterministic."""
    b, n = score.shape
    top, idx = score.topk(min(keep, n), -1)  # valid candidates first
    count = (top >= 0).sum(-1).clamp(min=1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    r = (torch.rand(b, hypotheses, 4, generator=gen).to(score.device) * count[:, None, None]).long()
    pick = idx.gather(1, r.flatten(1)).view(b, hypotheses, 4, 1).expand(-1, -1, -1, 2)
    take = lambda pts: pts[:, None].expand(-1, hypotheses, -1, -1).gather(2, pick)  # noqa: E731
    hom = coords.fit_homography(take(src), take(dst), exact=True)
    cand = idx[..., None].expand(-1, -1, 2)
    inl = _inliers(hom, src.gather(1, cand)[:, None], dst.gather(1, cand)[:, None], (top >= 0)[:, None], tol)
    return hom[torch.arange(b), inl.sum(-1).argmax(-1)]


class BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 conv + BN, identity or 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


def _layer(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), *[BasicBlock(cout, cout) for _ in range(blocks - 1)])


class Encoder(nn.Module):
    """E: ``(B, 1, H, W)`` -> ``(B, widths[2], H/4, W/4)``: stem (7x7 stride 2, no max-pool), layers 1-2."""

    def __init__(self, widths: Sequence[int] = (32, 32, 64, 128), blocks: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, widths[0], 7, 2))
        self.layer1 = _layer(widths[0], widths[1], blocks[0], 1)
        self.layer2 = _layer(widths[1], widths[2], blocks[1], 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.stem(2 * image - 1)))


class Projector(nn.Module):
    """P: E's features -> ``(B, widths[3])``: a layer-3 style stage (stride 2), global average pooling."""

    def __init__(self, widths: Sequence[int] = (32, 32, 64, 128), blocks: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        self.layer3 = _layer(widths[2], widths[3], blocks[2], 2)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.layer3(feat).mean((2, 3))


class AltONet(nn.Module):
    """R, E and P of AltO. ``forward(moving, fixed)`` on ``(B, 1, size, size)`` -> map ``(B, 2, size, size)``
    (moving_norm_from_fixed_norm); :meth:`matrix` gives the norm-frame homographies ``(B, 3, 3)``."""

    def __init__(self, dim: int = 2, size: int = TRAIN_SIZE, level: int = 4, width: int = 64, blur: float = 1.0,
                 hypotheses: int = 1000, enc_widths: Sequence[int] = (32, 32, 64, 128),
                 enc_blocks: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        if dim != 2:
            raise ValueError(f"AltO estimates 2D homographies; dim must be 2, got {dim}")
        if len(enc_widths) != 4 or len(enc_blocks) != 3 or min(enc_blocks) < 1:
            raise ValueError(f"enc_widths needs 4 widths (stem, layer 1, 2, 3) and enc_blocks 3 counts >= 1, "
                             f"got {enc_widths} and {enc_blocks}")
        if int(size) % int(level) or int(size) // int(level) < 4:
            raise ValueError(f"AltO: size {size} must be a multiple of level {level}, with at least 4 cells a side")
        self.dim, self.size = dim, int(size)
        self.reg = Matcher(level, width, blur, hypotheses)
        self.enc = Encoder(tuple(enc_widths), tuple(enc_blocks))
        self.proj = Projector(tuple(enc_widths), tuple(enc_blocks))

    def _check(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        want = (self.size, self.size)
        if moving.shape != fixed.shape or moving.dim() != 4 or moving.shape[1] != 1 or tuple(moving.shape[2:]) != want:
            raise ValueError(f"AltO needs moving and fixed of shape (B, 1, {self.size}, {self.size}), got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}; resize to {self.size}x{self.size}")

    def homography_px(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``H_px (B, 3, 3)``: moving px from fixed px (x, y) on the ``size`` grid."""
        self._check(moving, fixed)
        return self.reg(moving, fixed)

    def offsets(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The corners' offsets ``(B, 4, 2)`` in px (x, y) of the ``size`` grid (the paper's output)."""
        corners = corners_px((self.size, self.size)).to(moving.device)
        return coords.map_points(self.homography_px(moving, fixed), corners) - corners

    def matrix(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``M (B, 3, 3)``: moving_norm_from_fixed_norm, (row, col)."""
        return coords.norm_from_px(self.homography_px(moving, fixed), (self.size, self.size))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return coords.matrix_map(self.matrix(moving, fixed), (self.size, self.size))


def build(**config: Any) -> AltONet:
    """``AltONet(**config)``; ``config`` is what checkpoints store (``dim`` included)."""
    return AltONet(**config)


# ----------------------------------------------------------------------------- the registered method

@register_method("alto")
class AltO(NetworkMethod):
    """Registered method: AltO's registration network R (the matcher), one pass on the pair resized
    to 128 x 128;
    the homography is returned as a norm-frame matrix (resolution-free: the pipeline scales it to the
    images' physical grids). The affine pre-stage is off by default.

    Instance optimisation (``io_steps``) refines R's homography on the pair by its four corner
    offsets (:func:`napari_register.instance_opt.iter_corner_fit`: 8 numbers, the homography stays a
    homography) with MIND-SSC, blurred from ``io_blur`` px (working grid) down to none, Adam at
    ``io_lr`` px per step; the loaded network never changes."""

    dims = (2,)
    kind = "homography"
    # R's estimate is refined by the corner fit by default: on validation pairs from the training
    # photos it took the mean MACE from 7.3 to 3.9 px (docs/methods/alto.md). io_steps=0: R alone.
    default_io_steps = 150
    description = ("AltO: unsupervised multimodal homography (MIND-token matcher trained by alternating "
                   "Barlow Twins) + corner fit, 2D")
    build = staticmethod(build)
    io_lr = 0.5  # px of the working grid per Adam step
    io_preview_every = 10

    def __init__(self, dim: int, device: torch.device, checkpoint: str | Path | None = None, *,
                 affine_iterations: int = 0, io_lr: Optional[float] = None, io_blur: float = 8.0,
                 io_keep_better: bool = False) -> None:
        super().__init__(dim, device, checkpoint, affine_iterations=affine_iterations, io_lr=io_lr)
        self.io_blur, self.io_keep_better = float(io_blur), bool(io_keep_better)
        if self.io_blur < 0:
            raise ValueError(f"io_blur must be >= 0 px (0: no coarse start), got {io_blur}")

    def working_shape(self, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
        # R is trained at this size (its cells, head and tolerances are in these pixels): every image is
        # resized to it (the norm-frame matrix it returns holds for any grid of the same extent).
        return (self.net.size, self.net.size)

    def iter_run(self, moving: torch.Tensor, fixed: torch.Tensor, io_steps: int,
                 init: MethodOutput | None = None) -> Generator[Progress, None, MethodOutput]:
        # NetworkMethod.iter_run returns a map only; a homography method returns its matrix too, so
        # the pipeline exports an exact MatrixTransform.
        from ..instance_opt import iter_corner_fit
        from ..losses import get_similarity

        shape = tuple(fixed.shape[2:])
        affine: Optional[torch.Tensor] = None
        start: Optional[torch.Tensor] = None
        if init is not None and isinstance(init.state, dict):  # continue a previous run on this pair
            start, affine = init.state["matrix"], init.state["affine"]
        elif self.affine_iterations:
            affine = yield from self.iter_prealign(moving, fixed)
        if affine is not None:  # the network registers the pre-aligned image: M = affine @ network
            moving = coords.sample(moving, coords.matrix_map(affine, shape))
        full = (lambda m: affine.to(m.dtype) @ m) if affine is not None else (lambda m: m)
        if start is None:
            with torch.no_grad():
                start = self.net.matrix(moving, fixed)[0]
        m = start
        yield Progress("network", 1, 1, map=coords.matrix_map(full(m), shape))
        loss = None
        if io_steps > 0:
            m, loss = yield from iter_corner_fit(moving, fixed, start, io_steps, get_similarity("mind"), self.io_lr,
                                                 self.io_blur, "alto instance optimisation", self.io_preview_every, full,
                                                 keep_better=self.io_keep_better)
        return MethodOutput(map=coords.matrix_map(full(m), shape), matrix=full(m), loss=loss,
                            state={"matrix": m, "affine": affine})
