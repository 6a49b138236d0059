"""RAN checkpoints on held-out training-style pairs, for choosing between them without a benchmark
image: pairs that the training never drew (the pair source under another seed, the benchmark's
cases excluded as in training). Known-map pairs (rigid + smooth, as in the pre-training) give the
field's end-point error in voxels; inter-subject pairs give the LNCC term and the fold fraction.

    python -m benchmarks ran_heldout --dim 2 --pairs 64 --ran ran-2d=ran-2d --ran smooth=runs/ran/ran-2d-smooth.pt

Every checkpoint sees the same pairs. The pairs come from the training images (other crops, other
random maps, new synthetic label maps), so this measures fit to the training distribution, not
generalisation to new subjects: that is what ``ran_eval --tasks prostate_val`` is for.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from benchmarks import new_run_dir, provenance, write_run


def fold_fraction(disp_vox: torch.Tensor) -> float:
    """Share of voxels where det(I + grad u) <= 0, ``u`` ``(1, d, *S)`` in voxels, array order: the
    project's own Jacobian and fold count on a unit grid (physical order is the reversed array order)."""
    from napari_register.coords import Geometry
    from napari_register.metrics import fold_fraction as folds
    from napari_register.transforms import jacobian_determinant

    disp = np.moveaxis(disp_vox[0].detach().cpu().numpy(), 0, -1)[..., ::-1]
    return folds(jacobian_determinant(disp, Geometry.default(tuple(disp_vox.shape[2:]))))


def pairs(dim: int, n: int, seed: int) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
    from napari_register.data.pairs import PairSource
    from napari_register.methods.ran import TRAIN_SHAPE

    source = PairSource(dim, TRAIN_SHAPE[dim], 1, 0.5, seed, real_shift=0.1)
    return [source.supervised() for _ in range(n)], [source.one() for _ in range(n)]


@torch.no_grad()
def score(net: Optional[torch.nn.Module], known: list, real: list) -> dict[str, float]:
    """``net`` None: the identity map (what the pairs are before registration)."""
    from napari_register import coords
    from napari_register.losses import lncc
    from napari_register.methods.ran import LNCC_WINDOW, voxels_from_map

    def run(m: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return coords.identity_map(tuple(f.shape[2:])) if net is None else net(m, f)

    epe = [float((voxels_from_map(run(m, f)) - voxels_from_map(t)).square().sum(1).sqrt().mean())
           for m, f, t in known]
    sims, folds = [], []
    for m, f in real:
        phi = run(m, f)
        sims.append(float(lncc(coords.sample(m, phi), f, LNCC_WINDOW[m.dim() - 2])))
        folds.append(fold_fraction(voxels_from_map(phi)))
    return {"epe_vox": float(np.mean(epe)), "lncc": float(np.mean(sims)), "folds": float(np.mean(folds)),
            "pairs_with_folds": float(np.mean([f > 0 for f in folds]))}


def main(argv: Optional[list[str]] = None) -> None:
    from napari_register import weights
    from napari_register.methods.ran import build

    ap = argparse.ArgumentParser(prog="python -m benchmarks ran_heldout", description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, choices=(2, 3), required=True)
    ap.add_argument("--pairs", type=int, default=64, help="pairs of each kind")
    ap.add_argument("--seed", type=int, default=999, help="the pair source's seed (training used 0-3)")
    ap.add_argument("--ran", action="append", default=[], help="LABEL=CHECKPOINT (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = provenance("ran_heldout", argv)
    known, real = pairs(args.dim, args.pairs, args.seed)
    rows: list[dict[str, Any]] = [{"label": "identity (unregistered)", **score(None, known, real)}]
    for spec in args.ran:
        label, checkpoint = spec.split("=", 1)
        path = weights.resolve(checkpoint, checkpoint)
        net, card = weights.load(path, "ran", args.dim, build)
        init = (card.get("init_from") or {}).get("steps")
        steps = f"{card.get('steps')} (+{init} before)" if init else card.get("steps")
        rows.append({"label": label, "checkpoint": str(checkpoint), "steps": steps,
                     "lam": card.get("train", {}).get("lam"), **score(net, known, real)})
        print(rows[-1], flush=True)
    lines = ["| checkpoint | smoothness weight | steps | end-point error (vox, known maps) | LNCC term | folds % | "
             "pairs with folds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r.get('lam', '-')} | {r.get('steps', '-')} | {r['epe_vox']:.3f} | "
                     f"{r['lncc']:.4f} | {100 * r['folds']:.3f} | {100 * r['pairs_with_folds']:.0f} % |")
    out = new_run_dir(f"ran-heldout-{args.dim}d") if args.out is None else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"{args.pairs} known-map pairs and {args.pairs} inter-subject pairs, {args.dim}D, pair source seed "
            f"{args.seed}, at the training crop size; the networks alone.\n\n" + "\n".join(lines) + "\n")
    write_run(out, record, {"rows": rows}, text, title="RAN checkpoints on held-out training-style pairs")
    print(out / "results.md")
