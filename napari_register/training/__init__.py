"""Training: one loop that knows no method (:mod:`.loop`), driven by a recipe per method
(:mod:`.recipes`): which network from which config, the phases (each a loss on an optimiser over
some parameters; sequential or alternating) and a batch source.

``napari-register train --method M --dim D --out M.pt [generic flags] --recipe-options JSON``.
This module stays free of torch so ``napari-register --help`` is quick.
"""
from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The generic flags; a recipe's own knobs go in ``--recipe-options`` (recorded on the card)."""
    p.add_argument("--method", required=True, help="method whose network to train (e.g. carl)")
    p.add_argument("--dim", type=int, choices=(2, 3), required=True)
    p.add_argument("--out", required=True, help="checkpoint to write (.pt; a .json card goes next to it)")
    p.add_argument("--run-dir", help="folder for state.pt (resume) and log.jsonl; default: <out>.run")
    p.add_argument("--steps", type=int, default=2000, help="total steps (one batch each)")
    p.add_argument("--batch", type=int, default=1, help="pairs per step (per process under torchrun)")
    p.add_argument("--lr", type=float, default=2e-4, help="base learning rate (a recipe may schedule it)")
    p.add_argument("--shape", type=int, nargs="+", help="training grid (array order); recipe default if unset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints/state saves")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep a copy of the checkpoint (and card) every this many steps as "
                        "<run-dir>/step<N>.pt, for learning curves (0: none)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--init", help="start from the weights of this checkpoint (fresh optimisers)")
    p.add_argument("--config", default="{}", help="network config overrides as JSON, e.g. '{\"xi\": \"unet\"}'")
    p.add_argument("--recipe-options", default="{}",
                   help="the recipe's own settings as JSON (`napari-register train --method M --dim D "
                        "--out x --recipe-options help` lists them)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m napari_register.training",
                                description=__doc__.splitlines()[0])
    add_train_arguments(p)
    return p
