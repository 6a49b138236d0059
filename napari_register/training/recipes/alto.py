"""AltO's recipe: no ground truth in any loss; two phases alternating on every mini-batch (the
authors' code), each with its own AdamW over its own parameters.

* ``geometry`` (optimiser ``R``: the registration network only): the Geometry Barlow Twins loss
  between E(moving warped by R's homography) and E(fixed): per pair the H/4 * W/4 positions are the
  samples, channels standardised over them, ``sum (1 - C_ii)^2 + lam sum_{i != j} C_ij^2``, averaged
  over the batch. E runs in eval mode on detached weights: the gradient reaches R through the warped
  image, never E's weights or BatchNorm statistics.
* ``representation`` (optimiser ``EP``: encoder and projector): standard Barlow Twins across the
  batch on P's pooled projections of the warped moving image (R's prediction of the geometry phase
  on this batch, detached, as in the authors' code) and the fixed image; R is not run again.

``alternate: false`` is the ablation of the paper: both losses summed, one AdamW over every
parameter, E trained by the geometry loss too. AdamW (weight decay 1e-5), one-cycle learning rate
peaking at ``--lr`` (use 3e-4, the paper's), gradient norm clipped at 1.0 (R and E/P).

The photo pair source (:class:`napari_register.data.photos.PhotoPairs`, training split: the
benchmark's photos never appear) gives 128 x 128 pairs whose corners move by up to 32 px, a
modality change with probability ``modality``. Its ground truth is only *logged* (``geometry/mace``,
px, computed without gradient) to watch the run; it never enters a loss.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.func import functional_call

from ...objectives import barlow_twins, corner_loss
from ...coords import norm_from_px
from ...methods.alto import RHO, TRAIN_SIZE, build, warp
from ..recipe import Batch, Optimiser, Phase, Recipe, RunSettings, resolve_options, unwrap

DIMS = (2,)
OPTIONS: dict[str, Any] = {
    "alternate": True,     # false: both losses at once on one optimiser over all parameters (the ablation)
    "lam": 0.005,          # Barlow Twins off-diagonal weight (both losses)
    "modality": 0.5,       # probability of a modality change of the moving image
    "photometric": 0.5,    # blur / gamma / noise strength
    "rho": RHO,            # corner perturbation, px
    "size": TRAIN_SIZE,    # image side, px
    "weight_decay": 1e-5,  # AdamW
    "clip": 1.0,           # gradient-norm bound
    "pct_start": 0.3,      # one-cycle: share of the steps spent rising to --lr
}
WARPED = "alto_warped_moving"  # batch key: the geometry phase's detached warp, reused by the representation phase


@contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[None]:
    was = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was)


def frozen(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in eval mode on detached parameters: gradients flow to ``x`` only, and neither
    the weights nor the BatchNorm statistics change."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    with _mode(module, False):
        return functional_call(module, {**params, **dict(module.named_buffers())}, (x,))


def geometry_barlow_twins(feat_a: torch.Tensor, feat_b: torch.Tensor, lam: float) -> torch.Tensor:
    """Geometry Barlow Twins of two feature maps ``(B, C, h, w)``: per pair, the ``h * w`` positions
    are the samples; the mean over the batch."""
    return torch.stack([barlow_twins(feat_a.flatten(2)[k].T, feat_b.flatten(2)[k].T, lam)
                        for k in range(feat_a.shape[0])]).mean()


def one_cycle(peak: float, steps: int, pct_start: float = 0.3, div: float = 25.0,
              final_div: float = 1e4) -> Any:
    """``step -> lr`` of PyTorch's OneCycleLR (cosine): from ``peak / div`` up to ``peak`` over
    ``pct_start`` of the steps, then down to ``peak / div / final_div``."""
    up = max(int(pct_start * steps), 1)
    down = max(steps - up, 1)
    lo, end = peak / div, peak / div / final_div

    def cos(a: float, b: float, t: float) -> float:
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    return lambda step: cos(lo, peak, step / up) if step < up else cos(peak, end, (step - up) / down)


def recipe(settings: RunSettings, options: dict[str, Any]) -> Recipe:
    from ...data.photos import PhotoPairs

    o = resolve_options(OPTIONS, options, "alto")
    if not isinstance(o["alternate"], bool):
        raise ValueError(f"--recipe-options alternate must be true or false, got {o['alternate']!r}")
    size = int(o["size"])
    if settings.shape and tuple(settings.shape) != (size, size):
        raise ValueError(f"AltO trains on square {size}x{size} pairs (recipe option size); --shape "
                         f"{list(settings.shape)} disagrees: leave --shape out")
    clash = sorted(set(settings.config) & {"dim", "size"})
    if clash:
        raise ValueError(f"--config {clash}: set the image side with --recipe-options size (the data and the "
                         "network share it)")
    config = {"dim": 2, "size": size, **settings.config}
    build(**config)  # fail now on a bad config
    source = PhotoPairs("train", size=size, rho=float(o["rho"]), batch=settings.batch, seed=settings.seed,
                        modality=float(o["modality"]), photometric=float(o["photometric"]))
    lam = float(o["lam"])
    shape = (size, size)

    def monitor(net: nn.Module, h_px: torch.Tensor, batch: Batch) -> dict[str, float]:
        # ground truth for the log only (no gradient): MACE in px on the training pairs
        with torch.no_grad():
            return {"mace": float(corner_loss(h_px.detach(), batch["truth_matrix"], batch["corners"][0]))}

    def geometry_terms(model: nn.Module, batch: Batch, train_encoder: bool) -> tuple[torch.Tensor, dict[str, float]]:
        net = unwrap(model)
        moving, fixed = batch["moving"], batch["fixed"]
        h_px = net.homography_px(moving, fixed)
        warped = warp(moving, norm_from_px(h_px, shape))
        batch[WARPED] = warped.detach()
        if train_encoder:  # the ablation: E learns from the geometry loss too
            f_w, f_f = net.enc(warped), net.enc(fixed)
        else:
            f_w = frozen(net.enc, warped)
            with torch.no_grad():
                f_f = frozen(net.enc, fixed)
        loss = geometry_barlow_twins(f_w, f_f, lam)
        return loss, monitor(net, h_px, batch)

    def representation_terms(model: nn.Module, batch: Batch) -> torch.Tensor:
        net = unwrap(model)
        warped = batch.get(WARPED)
        if warped is None:  # not left by a geometry phase on this batch: R's current prediction
            with torch.no_grad(), _mode(net.reg, False):
                warped = warp(batch["moving"], net.matrix(batch["moving"], batch["fixed"]))
        z_w, z_f = net.proj(net.enc(warped)), net.proj(net.enc(batch["fixed"]))
        return barlow_twins(z_w, z_f, lam)

    def geometry(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return geometry_terms(model, batch, train_encoder=False)

    def representation(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return representation_terms(model, batch), {}

    def joint(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        geo, logs = geometry_terms(model, batch, train_encoder=True)
        rep = representation_terms(model, batch)
        return geo + rep, {**logs, "geometry": float(geo.detach()), "representation": float(rep.detach())}

    def batches(seed: int):
        source.gen.manual_seed(seed)
        return iter(source)

    rate = one_cycle(settings.lr, settings.steps, float(o["pct_start"]))
    adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=float(o["weight_decay"]))  # noqa: E731
    clip = None if o["clip"] is None else float(o["clip"])
    if o["alternate"]:
        optimisers = {
            "R": Optimiser(lr=rate, params=lambda m: unwrap(m).reg.parameters(), make=adamw, clip=clip),
            "EP": Optimiser(lr=rate, params=lambda m: [*unwrap(m).enc.parameters(), *unwrap(m).proj.parameters()],
                            make=adamw, clip=clip)}
        phases = [Phase("geometry", geometry, "R"), Phase("representation", representation, "EP")]
    else:
        optimisers = {"net": Optimiser(lr=rate, make=adamw, clip=clip)}
        phases = [Phase("joint", joint, "net")]
    train = {"loss": "alternating: Geometry Barlow Twins on E's maps (R), Barlow Twins on P's pooled "
                     "projections (E, P)" if o["alternate"] else
                     "ablation: Geometry Barlow Twins + Barlow Twins at once, one optimiser over R, E, P",
             "lam": lam, "schedule": f"one-cycle, peak {settings.lr:g}, pct_start {o['pct_start']}",
             "optimiser": f"AdamW, weight decay {o['weight_decay']:g}", "clip": clip,
             "ground_truth": "none in the loss; training MACE logged only"}
    return Recipe(config=config, build=build, batches=batches, optimisers=optimisers, phases=phases,
                  alternate=bool(o["alternate"]), data=source.describe(), card={"train": train, "options": o})
