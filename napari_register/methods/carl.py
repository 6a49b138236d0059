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

import json
import math
from pathlib import Path
from typing import Any, Generator

import torch
import torch.nn as nn

from .. import coords, weights
from ..instance_opt import finetune_copy, iter_affine, iter_optimise
from .blocks import ConvEncoder, CoordAttention, DisplacementNet, Down, Symmetrised, TwoStep
from .registry import Method, MethodOutput, Progress, register_method

TRAIN_SHAPE = {2: (160, 160), 3: (48, 56, 48)}
# Xi runs at 1/4 of the working grid, which puts an image at the scale the net was trained at: 3D
# brains at 2 mm (a CPU forward pass of a few seconds: SDPA 20^3 tokens 0.4 s, 24^3 1.4 s, 32^3
# 11 s), 2D images filling the 160^2 training grid as its slices did. benchmarks/carl_grid.py: OASIS
# Dice 0.624 / 0.635 / 0.639 / 0.639 at 12.6^3 / 16^3 / 20^3 / 24^3 tokens; 2D (symmetrised map)
# histology TRE 31.3 px at 40^2 against 41.0 at 48^2 (the previous default), photos MACE 20.0 against 21.9.
XI_TOKENS = {2: (TRAIN_SHAPE[2][0] // 4) * (TRAIN_SHAPE[2][1] // 4), 3: 20 ** 3}
# Instance optimisation runs on a copy of the pair at most this fine (the weights do not depend on
# the grid). In 3D that is the working grid: on OASIS (IO 50, 2 idle cores, before the affine
# stage) 12^3 tokens cost 1.2 s a step but lost the cortex (Dice 0.629); 16^3, 2.8 s, reached 0.649
# with 0.13 % folds, as the fine map departs from the grid it was fitted on; the working grid,
# 5.7 s, 0.649 with 0.013 % folds.
IO_TOKENS = {2: 32 * 32, 3: XI_TOKENS[3]}
# Our diffusion is |J - I|^2 (scaled by (n-1)^2, unlike ICON's), so the warm-up weight is small;
# a large one makes the attention collapse every voxel onto one point (J = 0 costs only 1/d).
LAM_GRADICON, LAM_DIFFUSION = 1.5, 0.001
# Instance optimisation weighs GradICON less than training did: at 1.5 the first steps buy inverse
# consistency with similarity and 50 steps barely move Dice (OASIS 0.631 -> 0.638, lr 1e-4 or 5e-4);
# 0.1 would suit OASIS better (IO 50, passes 2, io_eps 1e-5: 0.655 -> 0.660, folds 0.004 %) but folds
# the prostate pairs (0.58 % on average, 2 % on 03->08; 0.045 % at 0.3). ``io_reg="diffusion"`` on a
# GradICON-trained net (passes 1, eps 1e-3): weight 0.1 gave OASIS 0.648 with 0.41 % folds, 0.5 gave
# 0.643 with 0.11 % (GradICON 0.3: 0.641, 0.007 %).
IO_LAM = {"gradicon": 0.3, "diffusion": 0.5}
LNCC_WINDOW = {2: 9, 3: 7}
TRAIN_EPS = 1e-3  # training's LNCC variance floor (``--lncc-eps``)
# Psi2 run again on its own output (TwoStep{CARL, Psi2}, shared weights): OASIS network alone 0.639
# -> 0.647 (passes 2) -> 0.648 (3); with io_eps 1e-5, IO 50 0.648 -> 0.655 (2) -> 0.662 (3, GradICON
# 0.1). The prostate pairs lose: 0.654 -> 0.642 before IO, and IO 50 (passes 2, io_eps 1e-5) gives
# 0.751 with 0.045 % folds against 0.764 and 0.033 % with both off, a tie with ANTs SyN (0.751) in
# that run. Off by default; README: the settings for brains. 2D: not measured.
PASSES = 1
# IO's LNCC variance floor. 1e-3 (training's) treats patches with a standard deviation under 0.03 as
# flat, i.e. much of the brain's grey-white contrast in a 7-voxel window: OASIS IO 50 0.641 -> 0.648
# at 1e-5. A free field on CARL's map (optimize's loop, 30 steps) reaches 0.668 at 1e-3, 0.675 at
# 1e-5. Kept at 1e-3 by default: prostate IO 50 with 1e-5 alone gives 0.758 with 0.109 % folds
# (0.764, 0.033 % at 1e-3), with passes 2 as well 0.751.
IO_EPS = TRAIN_EPS  # what the shipped nets were trained with; their cards predate "lncc_eps"
# Steps over which IO's rate ramps up to io_lr (see iter_optimise). OASIS IO 50: 0.641 -> 0.647 with
# 10 (no early dip below the network's 0.639), but the prostate pairs, where IO must undo much of
# what the network did, lose (00->01 0.850 -> 0.823, 03->08 0.516 -> 0.491), so it is off by default.
IO_WARMUP = 0
# Options for brains (near-aligned pairs, thin grey-white contrast), chosen on the OASIS pair (IO 50
# traces, benchmarks/io_trace.py): passes 2 + io_eps 1e-5 0.655, + io_warmup 10 0.659; all four
# 0.6657, IO 100 0.6684 (folds 0.004 %; demons 0.6664). On the prostate pairs: 0.746 with 0.34 %
# folds (defaults: 0.764, 0.033 %), so only for brains (README).
BRAIN_SETTINGS: dict[str, Any] = {"passes": 3, "io_eps": 1e-5, "io_lam": 0.1, "io_warmup": 10}
# On by default: on the five prostate pairs it lifts CARL 0.534 -> 0.654 (+ IO 50: 0.764); on the
# already aligned OASIS pair it costs 0.002 (0.641 -> 0.639).
AFFINE_ITERATIONS = 50


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


def symmetric_loss(net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, reg: str = "gradicon",
                   lam: float = 1.5, window: int = 5, coarse: bool = False, eps: float = TRAIN_EPS
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict[str, float]]:
    """Register both ways; LNCC of both warped images plus ``lam`` x regulariser.

    ``reg`` is ``"diffusion"`` or ``"gradicon"``; ``coarse``: only ``Down{Down{Xi}}`` (the warm-up
    trains it alone with diffusion, as the reference does). Returns ``(loss, (phi_ab, phi_ba), logs)``.
    """
    from .. import losses  # imported late: only training and instance optimisation need it

    phi_ab = net(moving, fixed, coarse=coarse)
    phi_ba = net(fixed, moving, coarse=coarse)
    sim = 0.5 * (losses.lncc(coords.sample(moving, phi_ab), fixed, window, eps)
                 + losses.lncc(coords.sample(fixed, phi_ba), moving, window, eps))
    if reg == "diffusion":
        ident = coords.identity_map(tuple(fixed.shape[2:]), fixed.device, fixed.dtype)
        penalty = 0.5 * (losses.diffusion(phi_ab - ident) + losses.diffusion(phi_ba - ident))
    elif reg == "gradicon":
        penalty = 0.5 * (losses.gradicon(phi_ab, phi_ba) + losses.gradicon(phi_ba, phi_ab))
    else:
        raise ValueError(f"reg must be 'diffusion' or 'gradicon', got {reg!r}")
    loss = sim + lam * penalty
    return loss, (phi_ab, phi_ba), {"sim": float(sim.detach()), "reg": float(penalty.detach())}


def working_shape_for(dim: int, shape: tuple[int, ...], spacing_xyz: tuple[float, ...],
                      tokens: int | None = None) -> tuple[int, ...]:
    """Isotropic grid over the image's physical extent with about ``tokens`` (default ``XI_TOKENS``)
    tokens at Xi's quarter resolution, sizes divisible by 4, never finer than the image (rounded up to 4)."""
    spacing = [float(s) for s in spacing_xyz][::-1]  # array order
    extent = [n * s for n, s in zip(shape, spacing)]
    voxels = (XI_TOKENS[dim] if tokens is None else tokens) * 4 ** dim
    step = (math.prod(extent) / voxels) ** (1 / dim)
    out = []
    for n, e in zip(shape, extent):
        size = min(e / step, n)
        out.append(max(4 * round(size / 4), 8))
    return tuple(out)


def io_shape_for(dim: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The working grid scaled down (same extent) to about ``IO_TOKENS`` tokens at Xi's quarter
    resolution, sizes divisible by 4; never larger than ``shape``."""
    tokens = math.prod(shape) / 4 ** dim
    f = min(1.0, (IO_TOKENS[dim] / tokens) ** (1 / dim))
    return tuple(min(n, max(4 * round(n * f / 4), 8)) for n in shape)


@register_method("carl")
class CARL(Method):
    """Registered method: the CARL network, optionally with instance optimisation."""

    dims = (2, 3)
    needs_checkpoint = True
    default_io_steps = 50
    description = "CARL: coordinate attention + U-Net refinement, equivariant to translations (Greer et al.)"
    presets = {3: {"brain": BRAIN_SETTINGS}}  # measured on 3D brains only
    # IO rate (Adam): starts high, decays linearly. The network's first map undoes part of the affine
    # stage's alignment, so IO has far to go in 50 steps. IO 50 traces (benchmarks/io_trace.py):
    # constant 2e-4 is slow (prostate 0.739; pair 12->14 still rising at 100 steps), constant 1e-3
    # oscillates (OASIS 0.639); 8e-4 -> 8e-5 reaches prostate 0.764 (folds <= 0.06 %), OASIS 0.641.
    io_lr = 8e-4
    io_lr_decay = 0.1  # io_lr_end defaults to this fraction of io_lr

    def __init__(self, dim: int, device: torch.device, checkpoint: str | Path | None = None, *,
                 affine_iterations: int = AFFINE_ITERATIONS, io_lr: float | None = None,
                 io_lam: float | None = None, io_window: int | None = None,
                 io_lr_end: float | None = None, io_reg: str | None = None, tokens: int | None = None,
                 symmetric: bool | None = None, passes: int | None = None, io_eps: float | None = None,
                 io_warmup: int | None = None) -> None:
        super().__init__(dim, device, checkpoint)
        # Xi's token budget, which sets the working grid (the weights do not depend on it)
        self.tokens = XI_TOKENS[dim] if tokens is None else int(tokens)
        if self.tokens < 2 ** dim:
            raise ValueError(f"tokens must be at least {2 ** dim} (Xi's grid is the working grid / 4), "
                             f"got {tokens}")
        # instance-optimisation settings (None: the defaults below / the checkpoint's training ones)
        self.io_lr = self.io_lr if io_lr is None else float(io_lr)
        self.io_lam, self.io_window = io_lam, io_window
        if io_reg not in (None, *IO_LAM):
            raise ValueError(f"io_reg must be 'gradicon' or 'diffusion', got {io_reg!r}")
        self.io_reg = io_reg
        self.io_lr_end = self.io_lr * self.io_lr_decay if io_lr_end is None else float(io_lr_end)
        if not 0 < self.io_lr_end <= self.io_lr:
            raise ValueError(f"io_lr_end must be in (0, io_lr = {self.io_lr:g}], got {self.io_lr_end:g}; "
                             "set it equal to io_lr for a constant rate")
        # An affine pre-alignment (the one ``optimize`` uses) takes out the global rotation and scale
        # between subjects, which attention (equivariant to translations only) does not model. 0 skips it.
        self.affine_iterations = int(affine_iterations)
        path = weights.resolve(checkpoint, f"carl-{dim}d")
        self.net, self.card = load_net(path, dim, device)
        self.checkpoint_name = path.stem if path.parent == weights.CHECKPOINT_DIR else str(path)
        # Symmetrised map (coords.symmetrise: the net run both ways, a shared bias cancelled). On by
        # default unless the card says GradICON trained the net (its two directions then agree).
        # carl-2d: histology TRE 35.9 -> 31.3 px, folds 7.5 -> 3.2 %; photos MACE 28.9 -> 20.0 (clean),
        # 30.7 -> 24.6 (degraded), folds 20 -> 15 %, 24 -> 18 %. The GradICON-trained carl-3d loses a
        # little with it (OASIS 0.639 -> 0.637, prostate 0.654 -> 0.648), so it stays off there.
        gradicon_trained = self.card.get("train", {}).get("reg") == "gradicon"
        self.symmetric = not gradicon_trained if symmetric is None else bool(symmetric)
        self.net.passes = PASSES if passes is None else int(passes)
        if self.net.passes < 1:
            raise ValueError(f"passes must be at least 1 (the network once), got {passes}")
        # default: the floor the net was trained with (the same loss), IO_EPS for older cards
        train_eps = self.card.get("train", {}).get("lncc_eps", IO_EPS)
        self.io_eps = float(train_eps if io_eps is None else io_eps)
        if not self.io_eps > 0:
            raise ValueError(f"io_eps must be > 0 (it keeps flat patches finite), got {io_eps}")
        self.io_warmup = IO_WARMUP if io_warmup is None else int(io_warmup)
        if self.io_warmup < 0:
            raise ValueError(f"io_warmup must be >= 0 steps (0: no warm-up), got {io_warmup}")

    @classmethod
    def trainer(cls, dim: int, args: Any) -> Any:
        """Training recipe for :mod:`napari_register.train`: symmetric LNCC + diffusion for
        ``args.warmup`` steps, then + GradICON, on synthetic and real pairs (:mod:`synth`)."""
        from ..synth import PairSource
        from ..train import TrainSpec

        shape = tuple(args.shape) if args.shape else TRAIN_SHAPE[dim]
        config = {"dim": dim, "displacement_grid": list(shape), **json.loads(args.config)}
        build(**config)  # fail now on a bad config, not after loading the data
        source = PairSource(dim, shape, args.batch, args.real_fraction, args.seed,
                            real_shift=getattr(args, "real_shift", 0.15))
        lam = LAM_GRADICON if getattr(args, "lam", None) is None else args.lam
        lam_warm = LAM_DIFFUSION if getattr(args, "lam_warmup", None) is None else args.lam_warmup
        main_reg = getattr(args, "reg", None) or "gradicon"
        eps = TRAIN_EPS if getattr(args, "lncc_eps", None) is None else args.lncc_eps
        if not eps > 0:
            raise ValueError(f"--lncc-eps must be > 0, got {eps}")

        def loss(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
            reg = "diffusion" if step < args.warmup else main_reg
            # GradICON ramps up: at full weight at once, the noisy maps of the fresh stack make the
            # trivial minimum (everything mapped outside the image: flat warp, LNCC loss 1, GradICON
            # 0) cheaper than registering, and the net collapses onto it.
            ramp = min(1.0, (step - args.warmup + 1) / max(getattr(args, "ramp", 0), 1))
            weight = lam_warm if step < args.warmup else lam * ramp
            value, _, logs = symmetric_loss(model, moving, fixed, reg, weight, LNCC_WINDOW[dim],
                                            coarse=step < args.warmup, eps=eps)
            return value, logs

        def pairs(seed: int):
            source.gen.manual_seed(seed)
            return iter(source)

        train = {"loss": f"symmetric LNCC + diffusion on Down{{Down{{Xi}}}} (warm-up), then {main_reg} on the stack",
                 "reg": main_reg, "lam": lam, "lam_diffusion": lam_warm, "warmup": args.warmup,
                 "ramp": getattr(args, "ramp", 0),
                 "lncc_window": LNCC_WINDOW[dim], "lncc_eps": eps}
        return TrainSpec(config, build, loss, pairs, source.describe(), {"train": train})

    def working_shape(self, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
        return working_shape_for(self.dim, shape, spacing_xyz, self.tokens)

    def _map(self, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return (Symmetrised(net) if self.symmetric else net)(moving, fixed)

    def iter_run(self, moving: torch.Tensor, fixed: torch.Tensor, io_steps: int,
                 init: MethodOutput | None = None) -> Generator[Progress, None, MethodOutput]:
        from ..losses import get_similarity

        shape = tuple(fixed.shape[2:])
        if init is not None and isinstance(init.state, dict):  # continue a previous run on this pair
            net, affine = init.state["net"], init.state["affine"]
        else:
            net, affine = self.net, None
            if self.affine_iterations:
                sim = get_similarity("lncc", window=9)
                affine = yield from iter_affine(moving, fixed, sim, self.affine_iterations, stage="carl affine")
        # The network registers the affinely pre-aligned moving image; the map is affine o network.
        if affine is not None:
            moving = coords.sample(moving, coords.matrix_map(affine, shape))
        full = (lambda phi: coords.apply_matrix(affine, phi)) if affine is not None else (lambda phi: phi)
        with torch.no_grad():
            phi = self._map(net, moving, fixed)
        yield Progress("network", 1, 1, map=full(phi))
        if io_steps <= 0:
            return MethodOutput(map=full(phi), state={"net": net, "affine": affine})
        net = finetune_copy(net)  # the shipped model is never changed in place
        train = self.card.get("train", {})
        reg = self.io_reg or train.get("reg", "gradicon")  # default: the training's main loss
        # a diffusion-trained net (carl-2d) keeps its training weight; GradICON is weighed less (above)
        keep = reg == "diffusion" and train.get("reg") == reg and "lam" in train
        lam = float(self.io_lam if self.io_lam is not None else train["lam"] if keep else IO_LAM[reg])
        window = int(train.get("lncc_window", LNCC_WINDOW[self.dim]))
        window = window if self.io_window is None else int(self.io_window)
        io_shape = io_shape_for(self.dim, shape)
        mov_io, fix_io = coords.resize_image(moving, io_shape), coords.resize_image(fixed, io_shape)

        def loss_fn() -> tuple[torch.Tensor, torch.Tensor]:
            loss, (phi_ab, phi_ba), _ = symmetric_loss(net, mov_io, fix_io, reg, lam, window, eps=self.io_eps)
            # the preview shows the map the run returns; it is only looked at, never differentiated
            phi_ab, phi_ba = phi_ab.detach(), phi_ba.detach()
            return loss, full(coords.symmetrise(phi_ab, phi_ba) if self.symmetric else phi_ab)

        # previews every 5 steps: a step on the OASIS working grid takes 6-9 s on 2 cores
        final = yield from iter_optimise(net.parameters(), loss_fn, io_steps, self.io_lr, preview_every=5,
                                         lr_end=self.io_lr_end, warmup=self.io_warmup)
        net.eval()
        with torch.no_grad():
            phi = self._map(net, moving, fixed)
        return MethodOutput(map=full(phi), loss=final, state={"net": net, "affine": affine})
