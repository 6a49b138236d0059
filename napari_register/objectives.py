"""Training objectives built on the similarity measures and regularisers of :mod:`.losses`: ICON /
GradICON's symmetric loss (CARL's training and instance optimisation alike), Barlow Twins and the
corner loss (AltO's recipe)."""
from __future__ import annotations

from typing import Callable

import torch

from . import coords
from .losses import Window, diffusion, gradicon, lncc


def symmetric_loss(net: Callable[..., torch.Tensor], moving: torch.Tensor, fixed: torch.Tensor,
                   reg: str = "gradicon", lam: float = 1.5, window: Window = 5, eps: float = 1e-3,
                   **net_kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict[str, float]]:
    """Register both ways with ``net(moving, fixed, **net_kwargs) -> map``; LNCC of both warped
    images plus ``lam`` x regulariser (ICON / GradICON's objective).

    ``reg``: ``"diffusion"`` (of each displacement) or ``"gradicon"`` (of the two maps' composition).
    Returns ``(loss, (phi_ab, phi_ba), logs)``.
    """
    phi_ab = net(moving, fixed, **net_kwargs)
    phi_ba = net(fixed, moving, **net_kwargs)
    sim = 0.5 * (lncc(coords.sample(moving, phi_ab), fixed, window, eps)
                 + lncc(coords.sample(fixed, phi_ba), moving, window, eps))
    if reg == "diffusion":
        ident = coords.identity_map(tuple(fixed.shape[2:]), fixed.device, fixed.dtype)
        penalty = 0.5 * (diffusion(phi_ab - ident) + diffusion(phi_ba - ident))
    elif reg == "gradicon":
        penalty = 0.5 * (gradicon(phi_ab, phi_ba) + gradicon(phi_ba, phi_ab))
    else:
        raise ValueError(f"reg must be 'diffusion' or 'gradicon', got {reg!r}")
    loss = sim + lam * penalty
    return loss, (phi_ab, phi_ba), {"sim": float(sim.detach()), "reg": float(penalty.detach())}


def barlow_twins(z_a: torch.Tensor, z_b: torch.Tensor, lam: float = 0.005, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins loss (Zbontar et al., 2021) of two views ``(N, C)``: each channel standardised
    over the N samples, ``C = z_a^T z_b / N``, ``sum_i (1 - C_ii)^2 + lam sum_{i != j} C_ij^2``.

    The samples are the batch for the standard loss; AltO's geometry loss passes the H*W positions of
    one image pair as the samples (``feat.flatten(2)[k].T``).
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2 or z_a.shape[0] < 2:
        raise ValueError(f"barlow_twins: expected two (N, C) tensors of one shape with N >= 2, "
                         f"got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    n = z_a.shape[0]
    a = (z_a - z_a.mean(0)) / (z_a.std(0) + eps)
    b = (z_b - z_b.mean(0)) / (z_b.std(0) + eps)
    c = a.T @ b / n
    on = (1 - c.diagonal()).pow(2).sum()
    off = c.pow(2).sum() - c.diagonal().pow(2).sum()
    return on + lam * off


def corner_loss(matrix: torch.Tensor, truth: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Mean corner error (MACE) between two homographies ``(B, 3, 3)`` over ``corners (4, 2)``:
    the mean distance between where each maps the corners (same units as the corners)."""
    return (coords.map_points(matrix, corners) - coords.map_points(truth, corners)).norm(dim=-1).mean()

