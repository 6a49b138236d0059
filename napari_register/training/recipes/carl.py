"""CARL's recipe: symmetric LNCC + diffusion on ``Down{Down{Xi}}`` alone for ``warmup`` steps (as
the reference trains the attention first), then the whole stack with GradICON (or diffusion),
whose weight ramps up over ``ramp`` steps; one Adam throughout, on SynthMorph-style and real pairs
(:class:`napari_register.data.pairs.PairSource`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...objectives import symmetric_loss
from ...methods.carl import LAM_DIFFUSION, LAM_GRADICON, LNCC_WINDOW, TRAIN_EPS, TRAIN_SHAPE, build
from ..recipe import Batch, Optimiser, Phase, Recipe, RunSettings, resolve_options

DIMS = (2, 3)
OPTIONS: dict[str, Any] = {
    "warmup": 300,       # steps of the warm-up phase (diffusion on Down{Down{Xi}})
    "ramp": 200,         # steps over which the main regulariser's weight ramps up after it
    "reg": "gradicon",   # main regulariser: gradicon or diffusion
    "lam": LAM_GRADICON,  # its weight
    "lam_warmup": LAM_DIFFUSION,  # the warm-up's diffusion weight
    "lncc_eps": TRAIN_EPS,  # LNCC variance floor
    "lr_main": None,     # learning rate after the warm-up (default: --lr)
    "real_fraction": 0.5,  # share of pairs from real volumes
    "real_shift": 0.15,  # largest random translation of each real volume (norm units)
}


def recipe(settings: RunSettings, options: dict[str, Any]) -> Recipe:
    from ...data.pairs import PairSource

    o = resolve_options(OPTIONS, options, "carl")
    if o["reg"] not in ("gradicon", "diffusion"):
        raise ValueError(f"--recipe-options reg must be 'gradicon' or 'diffusion', got {o['reg']!r}")
    if not o["lncc_eps"] > 0:
        raise ValueError(f"--recipe-options lncc_eps must be > 0, got {o['lncc_eps']}")
    dim = settings.dim
    shape = settings.shape or TRAIN_SHAPE[dim]
    config = {"dim": dim, "displacement_grid": list(shape), **settings.config}
    build(**config)  # fail now on a bad config, not after loading the data
    source = PairSource(dim, shape, settings.batch, o["real_fraction"], settings.seed, real_shift=o["real_shift"])
    window, warmup = LNCC_WINDOW[dim], int(o["warmup"])

    def warm(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        value, _, logs = symmetric_loss(model, batch["moving"], batch["fixed"], "diffusion", o["lam_warmup"],
                                        window, o["lncc_eps"], coarse=True)
        return value, logs

    def main(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        # The weight ramps up: at full weight at once, the noisy maps of the fresh stack make the
        # trivial minimum (everything mapped outside the image: flat warp, LNCC loss 1, GradICON
        # 0) cheaper than registering, and the net collapses onto it.
        ramp = min(1.0, (step - warmup + 1) / max(int(o["ramp"]), 1))
        value, _, logs = symmetric_loss(model, batch["moving"], batch["fixed"], o["reg"], o["lam"] * ramp,
                                        window, o["lncc_eps"], coarse=False)
        return value, logs

    def batches(seed: int):
        source.gen.manual_seed(seed)
        return iter(source)

    lr_main = settings.lr if o["lr_main"] is None else float(o["lr_main"])
    rate = lambda step: settings.lr if step < warmup else lr_main  # noqa: E731
    train = {"loss": f"symmetric LNCC + diffusion on Down{{Down{{Xi}}}} (warm-up), then {o['reg']} on the stack",
             "reg": o["reg"], "lam": o["lam"], "lam_diffusion": o["lam_warmup"], "warmup": warmup,
             "ramp": o["ramp"], "lncc_window": window, "lncc_eps": o["lncc_eps"], "lr_main": lr_main}
    return Recipe(config=config, build=build, batches=batches,
                  optimisers={"net": Optimiser(lr=rate)},
                  phases=[Phase("warmup", warm, steps=warmup), Phase("main", main)],
                  data=source.describe(), card={"train": train, "options": o})
