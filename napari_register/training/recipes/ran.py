"""RAN's recipe, the paper's two stages on one Adam: ``pretrain`` steps of field supervision on
pairs made with a known rigid + smooth map (SynthMorph-style label images and real volumes,
:meth:`napari_register.data.pairs.PairSource.supervised`), then unsupervised NCC + the edge-aware
smoothness on inter-subject pairs (:class:`PairSource`). After a resume the source restarts with
``pretrain`` known-map pairs, which the unsupervised phase uses as ordinary pairs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...methods.ran import EDGE, LAM, LNCC_WINDOW, TRAIN_SHAPE, build, unsupervised_loss, voxels_from_map
from ..recipe import Batch, Optimiser, Phase, Recipe, RunSettings, resolve_options

DIMS = (2, 3)
OPTIONS: dict[str, Any] = {
    "pretrain": 300,     # steps of field-supervised pre-training
    "lam": LAM,          # smoothness weight of the unsupervised stage
    "edge": EDGE,        # s in exp(-s |grad I_fixed|^2)
    "real_fraction": 0.5,  # share of pairs from real volumes
    "real_shift": 0.1,   # largest random translation of each real volume (norm units)
}


def recipe(settings: RunSettings, options: dict[str, Any]) -> Recipe:
    from ...data.pairs import PairSource

    o = resolve_options(OPTIONS, options, "ran")
    if int(o["pretrain"]) < 0 or o["lam"] < 0 or o["edge"] < 0:
        raise ValueError(f"--recipe-options pretrain, lam and edge must be >= 0, got {o}")
    dim = settings.dim
    shape = settings.shape or TRAIN_SHAPE[dim]
    config = {"dim": dim, **settings.config}
    build(**config)  # fail now on a bad config, not after loading the data
    source = PairSource(dim, shape, settings.batch, o["real_fraction"], settings.seed, real_shift=o["real_shift"])
    pretrain = int(o["pretrain"])

    def supervised(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        phi = model(batch["moving"], batch["fixed"])
        # squared error in voxels, so a level's error weighs the same on any grid
        err = (voxels_from_map(phi) - voxels_from_map(batch["truth"])).square().sum(1).mean()
        return err, {"field_mse_vox": float(err.detach())}

    def unsupervised(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        value, _, logs = unsupervised_loss(model, batch["moving"], batch["fixed"], o["lam"], o["edge"])
        return value, logs

    def batches(seed: int):
        source.gen.manual_seed(seed)
        return source.supervised_batches(pretrain)

    train = {"loss": "field MSE on known maps (pre-training), then LNCC + edge-aware smoothness",
             "lam": o["lam"], "edge": o["edge"], "pretrain": pretrain, "lncc_window": LNCC_WINDOW[dim]}
    phases = ([Phase("pretrain", supervised, steps=pretrain)] if pretrain else []) + [Phase("main", unsupervised)]
    return Recipe(config=config, build=build, batches=batches, optimisers={"net": Optimiser(lr=settings.lr)},
                  phases=phases, data=source.describe(), card={"train": train, "options": o})
