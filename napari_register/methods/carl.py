"""CARL (Greer et al., "CARL: A Framework for Equivariant Image Registration", arXiv 2405.16738).

``CARL = TwoStep{Down{TwoStep{Down{Xi}, Psi1}}, Psi2}``: Xi is coordinate attention at a quarter of
the working resolution (exactly equivariant to integer translations of either image), Psi1/Psi2
are U-Nets refining with displacements at half and full working resolution. Trained with symmetric
LNCC plus diffusion, then GradICON; instance optimisation fine-tunes a copy with the same loss (GradICON
weighted less, so the pair's similarity leads), on the working grid in 3D (a coarser copy of the
pair in 2D), then maps on the working grid. At inference an affine stage (shared with ``optimize``)
runs first and the map is affine o network; each U-Net's steps are in voxels of its training grid.
``xi="unet"`` swaps Xi for a displacement U-Net: the baseline of the shift experiment.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import coords, weights
from .base import IOObjective, NetworkMethod, isotropic_working_shape
from .blocks import ConvEncoder, CoordAttention, DisplacementNet, Down, Symmetrised, TwoStep
from .registry import register_method

TRAIN_SHAPE = {2: (160, 160), 3: (48, 56, 48)}
# The measurements behind every constant below: docs/methods/carl.md ("Settings and why").
# Xi runs at 1/4 of the working grid: 3D brains at 2 mm (the scale the net trained at), 2D images
# filling the 160^2 training grid. The attention's cost grows with the square of the tokens.
XI_TOKENS = {2: (TRAIN_SHAPE[2][0] // 4) * (TRAIN_SHAPE[2][1] // 4), 3: 20 ** 3}
# Instance optimisation runs on a copy of the pair at most this fine (the weights do not depend on
# the grid); in 3D the working grid itself (coarser grids lose the cortex).
IO_TOKENS = {2: 32 * 32, 3: XI_TOKENS[3]}
# Our diffusion is |J - I|^2 (scaled by (n-1)^2, unlike ICON's), so the warm-up weight is small;
# a large one makes the attention collapse every voxel onto one point (J = 0 costs only 1/d).
LAM_GRADICON, LAM_DIFFUSION = 1.5, 0.001
# IO weighs GradICON less than training did, so the pair's similarity leads.
IO_LAM = {"gradicon": 0.3, "diffusion": 0.5}
LNCC_WINDOW = {2: 9, 3: 7}
TRAIN_EPS = 1e-3  # training's LNCC variance floor
PASSES = 1  # extra Psi2 passes (TwoStep{CARL, Psi2}, shared weights); more help brains, hurt prostate
IO_EPS = TRAIN_EPS  # IO's LNCC floor for cards that predate "lncc_eps"
IO_WARMUP = 0  # steps over which IO's rate ramps up (see iter_optimise)
# Options for brains (near-aligned pairs, thin grey-white contrast), chosen on the OASIS pair; they
# lose on the prostate pairs, so they are a preset, not the default.
BRAIN_SETTINGS: dict[str, Any] = {"passes": 3, "io_eps": 1e-5, "io_lam": 0.1, "io_warmup": 10}


class CARLNet(nn.Module):
    """The CARL stack; ``forward(moving, fixed)`` on ``(B, 1, *S)`` -> map ``(B, d, *S)``."""

    def __init__(self, dim: int, xi: str = "attention", width: int = 16, features: int = 32,
                 dilations: tuple[int, ...] = (1, 2, 4, 2, 1),
                 unet_channels: tuple[int, ...] = (16, 32, 32, 32), attention_scale: float = 16.0,
                 displacement_grid: tuple[int, ...] | None = None) -> None:
        super().__init__()
        # displacement_grid: the training grid; each U-Net's steps keep their voxel length at any grid
        # (see DisplacementNet), at its own level's resolution (full, 1/2, 1/4).
        ref = (lambda k: None) if displacement_grid is None else (
            lambda k: tuple(int(n) // 2 ** k for n in displacement_grid))
        if xi == "attention":
            first: nn.Module = CoordAttention(ConvEncoder(dim, 1, width, tuple(dilations), features),
                                              attention_scale)
        elif xi == "unet":
            first = DisplacementNet(dim, tuple(unet_channels), ref(2))
        else:
            raise ValueError(f"xi must be 'attention' (CARL) or 'unet' (displacement baseline), got {xi!r}")
        psi1 = DisplacementNet(dim, tuple(unet_channels), ref(1))
        psi2 = DisplacementNet(dim, tuple(unet_channels), ref(0))
        self.net = TwoStep(Down(TwoStep(Down(first), psi1)), psi2)
        self.dim = dim
        # Extra Psi2 passes at inference and IO (a runtime setting, not a weight): TwoStep{CARL, Psi2}.
        self.passes = 1

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, coarse: bool = False) -> torch.Tensor:
        """Map ``(B, d, *S)``; ``coarse=True``: only ``Down{Down{Xi}}`` (the first training phase)."""
        if moving.shape != fixed.shape or moving.dim() != self.dim + 2:
            raise ValueError(f"CARL {self.dim}D needs moving and fixed of one shape (B, 1, *S) with {self.dim} "
                             f"spatial dims, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        if coarse:
            return Down(self.net.first.inner.first)(moving, fixed)
        net: nn.Module = self.net
        for _ in range(self.passes - 1):  # Psi2 again on the moving image warped so far
            net = TwoStep(net, self.net.second)
        return net(moving, fixed)


def build(**config: Any) -> CARLNet:
    """``CARLNet(**config)``; ``config`` is what checkpoints store (``dim`` included)."""
    return CARLNet(**config)


def load_net(path: str | Path, dim: int, device: torch.device | str = "cpu") -> tuple[CARLNet, dict[str, Any]]:
    """A CARL checkpoint as ``(net, card)``. Checkpoints saved before ``displacement_grid`` was a
    config key learned their steps on the training grid their card records (``data.shape``)."""
    def upgrade(config: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
        shape = card.get("data", {}).get("shape")
        if "displacement_grid" not in config and shape is not None:
            config["displacement_grid"] = tuple(shape)
        return config

    return weights.load(path, "carl", dim, build, device, upgrade=upgrade)


def working_shape_for(dim: int, shape: tuple[int, ...], spacing_xyz: tuple[float, ...],
                      tokens: int | None = None) -> tuple[int, ...]:
    """Isotropic grid over the image's physical extent with about ``tokens`` (default ``XI_TOKENS``)
    tokens at Xi's quarter resolution, sizes divisible by 4, never finer than the image (rounded up to 4)."""
    return isotropic_working_shape(shape, spacing_xyz, (XI_TOKENS[dim] if tokens is None else tokens) * 4 ** dim, 4)


def io_shape_for(dim: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The working grid scaled down (same extent) to about ``IO_TOKENS`` tokens at Xi's quarter
    resolution, sizes divisible by 4; never larger than ``shape``."""
    tokens = math.prod(shape) / 4 ** dim
    f = min(1.0, (IO_TOKENS[dim] / tokens) ** (1 / dim))
    return tuple(min(n, max(4 * round(n * f / 4), 8)) for n in shape)


@register_method("carl")
class CARL(NetworkMethod):
    """Registered method: the CARL network, optionally with instance optimisation."""

    dims = (2, 3)
    default_io_steps = 50
    # an IO step on a brain takes 6-12 s on 2 CPU cores (50 steps: 5-10 min): the CPU runs the
    # network alone unless IO is asked for (docs/methods/carl.md)
    default_io_steps_cpu = 0
    # per working voxel on 2 CPU threads (OASIS: 72x92x76; histology: 144x176)
    network_seconds = {2: 3e-6, 3: 2.2e-6}
    io_seconds = {2: 7e-6, 3: 2.5e-5}
    description = "CARL: coordinate attention + U-Net refinement, equivariant to translations (Greer et al.)"
    presets = {3: {"brain": BRAIN_SETTINGS}}  # measured on 3D brains only
    # IO rate (Adam): starts high, decays linearly; the network's first map undoes part of the affine
    # stage's alignment, so IO has far to go in 50 steps (traces: docs/methods/carl.md).
    io_lr = 8e-4
    io_lr_decay = 0.1
    io_preview_every = 5  # a step on the OASIS working grid takes 6-9 s on 2 cores
    build = staticmethod(build)

    def __init__(self, dim: int, device: torch.device, checkpoint: str | Path | None = None, *,
                 affine_iterations: int = 200, io_lr: float | None = None,
                 io_lam: float | None = None, io_window: int | None = None,
                 io_lr_end: float | None = None, io_reg: str | None = None, tokens: int | None = None,
                 symmetric: bool | None = None, passes: int | None = None, io_eps: float | None = None,
                 io_warmup: int | None = None) -> None:
        super().__init__(dim, device, checkpoint, affine_iterations=affine_iterations, io_lr=io_lr,
                         io_lr_end=io_lr_end, io_warmup=IO_WARMUP if io_warmup is None else io_warmup)
        # Xi's token budget, which sets the working grid (the weights do not depend on it)
        self.tokens = XI_TOKENS[dim] if tokens is None else int(tokens)
        if self.tokens < 2 ** dim:
            raise ValueError(f"tokens must be at least {2 ** dim} (Xi's grid is the working grid / 4), "
                             f"got {tokens}")
        # instance-optimisation settings (None: the checkpoint's training ones / the defaults above)
        self.io_lam, self.io_window = io_lam, io_window
        if io_reg not in (None, *IO_LAM):
            raise ValueError(f"io_reg must be 'gradicon' or 'diffusion', got {io_reg!r}")
        self.io_reg = io_reg
        # Symmetrised map (coords.symmetrise: the net run both ways, a shared bias cancelled): on
        # unless the card says GradICON trained the net (its two directions then agree).
        self.symmetric = self.train_card.get("reg") != "gradicon" if symmetric is None else bool(symmetric)
        self.net.passes = PASSES if passes is None else int(passes)
        if self.net.passes < 1:
            raise ValueError(f"passes must be at least 1 (the network once), got {passes}")
        # default: the floor the net was trained with (the same loss), IO_EPS for older cards
        self.io_eps = float(self.train_card.get("lncc_eps", IO_EPS) if io_eps is None else io_eps)
        if not self.io_eps > 0:
            raise ValueError(f"io_eps must be > 0 (it keeps flat patches finite), got {io_eps}")

    def load(self, path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
        return load_net(path, self.dim, device)

    def working_shape(self, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
        return working_shape_for(self.dim, shape, spacing_xyz, self.tokens)

    def memory_bytes(self, shape: tuple[int, ...], io_steps: int) -> int:
        # Fitted to measured CPU peaks (3D, 40^3-80^3 working grids): the attention's score matrices
        # grow with tokens^2, the U-Nets with voxels; instance optimisation keeps both for backward.
        voxels, pairs = math.prod(shape), (math.prod(shape) / 4 ** self.dim) ** 2
        need = 300 * voxels + 8 * pairs
        if io_steps > 0:
            io = io_shape_for(self.dim, shape)
            io_voxels, io_pairs = math.prod(io), (math.prod(io) / 4 ** self.dim) ** 2
            need = max(need, 300e6 + 850 * io_voxels + 22 * io_pairs)
        return int(need)

    def predict(self, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return (Symmetrised(net) if self.symmetric else net)(moving, fixed)

    def io_objective(self, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> IOObjective:
        from ..objectives import symmetric_loss

        train = self.train_card
        reg = self.io_reg or train.get("reg", "gradicon")  # default: the training's main loss
        # a diffusion-trained net (carl-2d) keeps its training weight; GradICON is weighed less (above)
        keep = reg == "diffusion" and train.get("reg") == reg and "lam" in train
        lam = float(self.io_lam if self.io_lam is not None else train["lam"] if keep else IO_LAM[reg])
        window = int(train.get("lncc_window", LNCC_WINDOW[self.dim]) if self.io_window is None else self.io_window)
        io_shape = io_shape_for(self.dim, tuple(fixed.shape[2:]))
        mov_io, fix_io = coords.resize_image(moving, io_shape), coords.resize_image(fixed, io_shape)

        def objective() -> tuple[torch.Tensor, torch.Tensor]:
            loss, (phi_ab, phi_ba), _ = symmetric_loss(net, mov_io, fix_io, reg, lam, window, eps=self.io_eps)
            # the preview shows the map the run returns; it is only looked at, never differentiated
            phi_ab, phi_ba = phi_ab.detach(), phi_ba.detach()
            return loss, coords.symmetrise(phi_ab, phi_ba) if self.symmetric else phi_ab

        return objective
