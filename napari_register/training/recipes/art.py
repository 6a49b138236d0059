"""ART's recipe: supervised by the photo pair source's ground-truth map. Per refinement step, L2 (px)
on ``points`` random points against the true map (later steps weighted more, ``gamma^(K-k)``), plus
``lam_h`` x the L1 homography term on the final map, plus ``lam_att`` x the cross-entropy of each
step's attention against where each fixed pixel's content truly is; the first ``pretrain`` steps
train the attention alone (fields at the identity). One AdamW with warm-up and a cosine decay.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ...methods.art import attention_loss, build, homography_loss, point_loss
from ..recipe import Batch, Optimiser, Phase, Recipe, RunSettings, resolve_options, unwrap

DIMS = (2,)
OPTIONS: dict[str, Any] = {
    "points": 100,        # random points per step for the point loss
    "gamma": 0.8,         # weight of step k: gamma^(K-k)
    "lam_h": 0.1,         # homography term
    "lam_att": 10.0,      # attention term: cross-entropy against where each pixel truly is (0: the paper's loss)
    "pretrain": 600,      # steps training the attention alone (fields at the identity), before the point loss
    "rho": None,          # corner perturbation (px of the patch); default: the AltO protocol scaled (size / 4)
    "patch": None,        # side of the patch whose corners move; default 2/3 of the image (128 of 192)
    "scale": [0.8, 1.2],  # global scale range (moving / fixed)
    "elastic": 0.5,       # smooth elastic part, px amplitude
    "photometric": 1.0,   # blur / gamma / noise strength
    "modality": 0.1,      # probability of a modality change
    "weight_decay": 1e-4,
    "warmup": 100,        # steps of linear learning-rate warm-up before the cosine decay
}


def recipe(settings: RunSettings, options: dict[str, Any]) -> Recipe:
    from ...data.photos import PhotoPairs

    o = resolve_options(OPTIONS, options, "art")
    size = settings.shape[0] if settings.shape else 96
    if settings.shape and (len(settings.shape) != 2 or settings.shape[0] != settings.shape[1]):
        raise ValueError(f"ART trains on square images: --shape S S (S = 12 * 2^K), got {settings.shape}")
    config = {"dim": 2, "size": size, **settings.config}
    build(**config)  # fail now on a bad config
    patch = int(o["patch"] or round(size * 2 / 3))
    rho = float(o["rho"] or patch / 4)
    source = PhotoPairs("train", size=patch, rho=rho, view=size, batch=settings.batch, seed=settings.seed,
                        scale=tuple(o["scale"]), elastic=o["elastic"], photometric=o["photometric"],
                        modality=o["modality"])
    gen = torch.Generator().manual_seed(settings.seed + 17)  # the random points of the loss

    def loss(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        found: list = []
        maps = model(batch["moving"], batch["fixed"], found=found if o["lam_att"] else None)
        truth = batch["truth_map"]
        k = len(maps)
        points = [point_loss(phi, truth, o["points"], gen) for phi in maps]
        total = sum(o["gamma"] ** (k - 1 - i) * p for i, p in enumerate(points))
        reg = homography_loss(maps[-1])
        logs = {f"px2_step{i + 1}": float(p.detach()) for i, p in enumerate(points)}
        if found:
            att = [attention_loss(w, d, truth) for w, d in found]
            total = total + o["lam_att"] * sum(att) / len(att)
            logs.update({f"att_step{i + 1}": float(a.detach()) for i, a in enumerate(att)})
        return total + o["lam_h"] * reg, {**logs, "homography": float(reg.detach())}

    def attention(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        # global matching first: cheap (no refinement), and its gradient is not drowned by the
        # point loss's while the attention is still diffuse (docs/methods/art.md)
        net = unwrap(model)
        weights = net.match(batch["moving"], batch["fixed"])
        ident = batch["truth_map"].new_tensor([1.0, 1.0, 0.0, 0.0]).view(1, 4, 1, 1).expand(len(weights[0]), 4, 2, 2)
        att = [attention_loss(w, ident, batch["truth_map"]) for w in weights]
        return sum(att) / len(att), {f"att_step{i + 1}": float(a.detach()) for i, a in enumerate(att)}

    def rate(step: int) -> float:
        warm = min(1.0, (step + 1) / max(int(o["warmup"]), 1))
        return settings.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / max(settings.steps, 1), 1.0)))

    def batches(seed: int):
        source.gen.manual_seed(seed)
        return iter(source)

    pretrain = int(o["pretrain"]) if o["lam_att"] and config.get("cross_attention", True) else 0
    phases = ([Phase("attention", attention, steps=pretrain)] if pretrain else []) + [Phase("supervised", loss)]
    adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=o["weight_decay"])  # noqa: E731
    train = {"loss": "point L2 (px) per step against the true map + lam_h x homography L1 + lam_att x attention "
                     "cross-entropy; the attention alone for the first `pretrain` steps", "size": size,
             "patch": patch, "rho": rho}
    return Recipe(config=config, build=build, batches=batches, optimisers={"net": Optimiser(lr=rate, make=adamw)},
                  phases=phases, data=source.describe(), card={"train": train, "options": o})
