"""CARL (Greer et al., "CARL: A Framework for Equivariant Image Registration", arXiv 2405.16738).

``CARL = TwoStep{Down{TwoStep{Down{Xi}, Psi1}}, Psi2}``: Xi is coordinate attention at a quarter of
the working resolution (exactly equivariant to integer translations of either image), Psi1/Psi2
are U-Nets refining with displacements at half and full working resolution. Trained with symmetric
LNCC plus diffusion, then GradICON; instance optimisation fine-tunes a copy with the same loss, on
a coarser copy of the pair (about the training grid, for speed), then maps on the working grid.
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
from ..instance_opt import finetune_copy, iter_optimise
from .blocks import ConvEncoder, CoordAttention, DisplacementNet, Down, TwoStep
from .registry import Method, MethodOutput, Progress, register_method

# Xi runs at 1/4 of the working grid; these token counts keep a CPU forward pass at a few seconds
# (2 cores, SDPA: 20^3 tokens 0.4 s, 24^3 1.4 s, 32^3 11 s).
XI_TOKENS = {2: 48 * 48, 3: 20 ** 3}
# Instance optimisation runs on a coarser copy of the pair (about the training grid's token count):
# the weights do not depend on the grid, and a step on the full OASIS grid costs ~6x as much
# (21.6 s against 3.6 s, measured side by side on 2 busy cores).
IO_TOKENS = {2: 32 * 32, 3: 12 ** 3}
TRAIN_SHAPE = {2: (160, 160), 3: (48, 56, 48)}
# Our diffusion is |J - I|^2 (scaled by (n-1)^2, unlike ICON's), so the warm-up weight is small;
# a large one makes the attention collapse every voxel onto one point (J = 0 costs only 1/d).
LAM_GRADICON, LAM_DIFFUSION = 1.5, 0.001
LNCC_WINDOW = {2: 9, 3: 7}


class CARLNet(nn.Module):
    """The CARL stack; ``forward(moving, fixed)`` on ``(B, 1, *S)`` -> map ``(B, d, *S)``."""

    def __init__(self, dim: int, xi: str = "attention", width: int = 16, features: int = 32,
                 dilations: tuple[int, ...] = (1, 2, 4, 2, 1),
                 unet_channels: tuple[int, ...] = (16, 32, 32, 32), attention_scale: float = 16.0) -> None:
        super().__init__()
        if xi == "attention":
            first: nn.Module = CoordAttention(ConvEncoder(dim, 1, width, tuple(dilations), features),
                                              attention_scale)
        elif xi == "unet":
            first = DisplacementNet(dim, tuple(unet_channels))
        else:
            raise ValueError(f"xi must be 'attention' (CARL) or 'unet' (displacement baseline), got {xi!r}")
        psi1 = DisplacementNet(dim, tuple(unet_channels))
        psi2 = DisplacementNet(dim, tuple(unet_channels))
        self.net = TwoStep(Down(TwoStep(Down(first), psi1)), psi2)
        self.dim = dim

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, coarse: bool = False) -> torch.Tensor:
        """Map ``(B, d, *S)``; ``coarse=True``: only ``Down{Down{Xi}}`` (the first training phase)."""
        if moving.shape != fixed.shape or moving.dim() != self.dim + 2:
            raise ValueError(f"CARL {self.dim}D needs moving and fixed of one shape (B, 1, *S) with {self.dim} "
                             f"spatial dims, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        if coarse:
            return Down(self.net.first.inner.first)(moving, fixed)
        return self.net(moving, fixed)


def build(**config: Any) -> CARLNet:
    """``CARLNet(**config)``; ``config`` is what checkpoints store (``dim`` included)."""
    return CARLNet(**config)


def symmetric_loss(net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, reg: str = "gradicon",
                   lam: float = 1.5, window: int = 5, coarse: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Register both ways; LNCC of both warped images plus ``lam`` x regulariser.

    ``reg`` is ``"diffusion"`` or ``"gradicon"``; ``coarse``: only ``Down{Down{Xi}}`` (the warm-up
    trains it alone with diffusion, as the reference does). Returns ``(loss, map, logs)``.
    """
    from .. import losses  # imported late: only training and instance optimisation need it

    phi_ab = net(moving, fixed, coarse=coarse)
    phi_ba = net(fixed, moving, coarse=coarse)
    sim = 0.5 * (losses.lncc(coords.sample(moving, phi_ab), fixed, window)
                 + losses.lncc(coords.sample(fixed, phi_ba), moving, window))
    if reg == "diffusion":
        ident = coords.identity_map(tuple(fixed.shape[2:]), fixed.device, fixed.dtype)
        penalty = 0.5 * (losses.diffusion(phi_ab - ident) + losses.diffusion(phi_ba - ident))
    elif reg == "gradicon":
        penalty = 0.5 * (losses.gradicon(phi_ab, phi_ba) + losses.gradicon(phi_ba, phi_ab))
    else:
        raise ValueError(f"reg must be 'diffusion' or 'gradicon', got {reg!r}")
    loss = sim + lam * penalty
    return loss, phi_ab, {"sim": float(sim.detach()), "reg": float(penalty.detach())}


def working_shape_for(dim: int, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
    """Isotropic grid over the image's physical extent with about ``XI_TOKENS`` tokens at Xi's
    quarter resolution, sizes divisible by 4, never finer than the image (rounded up to 4)."""
    spacing = [float(s) for s in spacing_xyz][::-1]  # array order
    extent = [n * s for n, s in zip(shape, spacing)]
    voxels = XI_TOKENS[dim] * 4 ** dim
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
    io_lr = 1e-4

    def __init__(self, dim: int, device: torch.device, checkpoint: str | Path | None = None) -> None:
        super().__init__(dim, device, checkpoint)
        path = weights.resolve(checkpoint, f"carl-{dim}d")
        self.net, self.card = weights.load(path, "carl", dim, build, device)
        self.checkpoint_name = path.stem if path.parent == weights.CHECKPOINT_DIR else str(path)

    @classmethod
    def trainer(cls, dim: int, args: Any) -> Any:
        """Training recipe for :mod:`napari_register.train`: symmetric LNCC + diffusion for
        ``args.warmup`` steps, then + GradICON, on synthetic and real pairs (:mod:`synth`)."""
        from ..synth import PairSource
        from ..train import TrainSpec

        config = {"dim": dim, **json.loads(args.config)}
        build(**config)  # fail now on a bad config, not after loading the data
        shape = tuple(args.shape) if args.shape else TRAIN_SHAPE[dim]
        source = PairSource(dim, shape, args.batch, args.real_fraction, args.seed)
        lam = LAM_GRADICON if getattr(args, "lam", None) is None else args.lam
        lam_warm = LAM_DIFFUSION if getattr(args, "lam_warmup", None) is None else args.lam_warmup
        main_reg = getattr(args, "reg", None) or "gradicon"

        def loss(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
            reg = "diffusion" if step < args.warmup else main_reg
            # GradICON ramps up: at full weight at once, the noisy maps of the fresh stack make the
            # trivial minimum (everything mapped outside the image: flat warp, LNCC loss 1, GradICON
            # 0) cheaper than registering, and the net collapses onto it.
            ramp = min(1.0, (step - args.warmup + 1) / max(getattr(args, "ramp", 0), 1))
            weight = lam_warm if step < args.warmup else lam * ramp
            value, _, logs = symmetric_loss(model, moving, fixed, reg, weight, LNCC_WINDOW[dim],
                                            coarse=step < args.warmup)
            return value, logs

        def pairs(seed: int):
            source.gen.manual_seed(seed)
            return iter(source)

        train = {"loss": f"symmetric LNCC + diffusion on Down{{Down{{Xi}}}} (warm-up), then {main_reg} on the stack",
                 "reg": main_reg, "lam": lam, "lam_diffusion": lam_warm, "warmup": args.warmup,
                 "ramp": getattr(args, "ramp", 0),
                 "lncc_window": LNCC_WINDOW[dim]}
        return TrainSpec(config, build, loss, pairs, source.describe(), {"train": train})

    def working_shape(self, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
        return working_shape_for(self.dim, shape, spacing_xyz)

    def iter_run(self, moving: torch.Tensor, fixed: torch.Tensor, io_steps: int,
                 init: MethodOutput | None = None) -> Generator[Progress, None, MethodOutput]:
        # Continue a previous instance optimisation (its fine-tuned copy rides in ``state``).
        net = init.state if init is not None and isinstance(init.state, CARLNet) else self.net
        with torch.no_grad():
            phi = net(moving, fixed)
        yield Progress("network", 1, 1, map=phi)
        if io_steps <= 0:
            return MethodOutput(map=phi, state=net if net is not self.net else None)
        net = finetune_copy(net)  # the shipped model is never changed in place
        reg = self.card.get("train", {}).get("reg", "gradicon")  # the training's main loss
        lam = float(self.card.get("train", {}).get("lam", LAM_GRADICON))
        window = int(self.card.get("train", {}).get("lncc_window", LNCC_WINDOW[self.dim]))
        io_shape = io_shape_for(self.dim, tuple(fixed.shape[2:]))
        mov_io, fix_io = coords.resize_image(moving, io_shape), coords.resize_image(fixed, io_shape)

        def loss_fn() -> tuple[torch.Tensor, torch.Tensor]:
            loss, phi_ab, _ = symmetric_loss(net, mov_io, fix_io, reg, lam, window)
            return loss, phi_ab

        final = yield from iter_optimise(net.parameters(), loss_fn, io_steps, self.io_lr)
        net.eval()
        with torch.no_grad():
            phi = net(moving, fixed)
        return MethodOutput(map=phi, loss=final, state=net)
