"""AltO against the peers on the photo homography task (``clean`` and ``modality`` variants), MACE in px.

Every method goes through the shared harness (:func:`benchmarks.peers.run_peer`; ours through
``api.register``, the peers as installed): MACE per pair, its mean and median, the acceptable rate
(MACE < 3 / 5 / 10 px; a failed pair counts as not acceptable) and the AUC of the cumulative error
curve up to 10 and 25 px (normalised to 1; a failed pair counts as an infinite error). The cases are
:func:`benchmarks.photos.cases` for seeds ``--seeds`` (6 photos each, never in training). Peers
that are not installed (OpenCV SIFT, elastix: the ``bench`` extra) are reported as such and left out.

    python -m benchmarks alto_eval --alto alto=alto-2d --alto no-alt=runs/alto/alto-2d-noalt.pt@0 --seeds 0 1 2 3
    python -m benchmarks alto_eval --select runs/alto/snapshots/*.pt   # model selection, see below

``--select``: rank checkpoints by MACE on *validation* pairs from the training photos (the
training split with seeds far from training's, the benchmark's 192 px geometry, half of them with a
modality change). This uses ground truth, for model selection only; it never sees a benchmark photo.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks import new_run_dir, peers, photos, provenance, write_run
from benchmarks.run import _photo_pair, _score_photo, ours

AUC_AT = (10.0, 25.0)
ACCEPT = (3.0, 5.0, 10.0)
VALIDATION_SEED = 777_000_000  # far from training's data seeds (seed * 1000 + rank) and the benchmark's


def installed_peers() -> tuple[dict[str, peers.Peer], dict[str, str]]:
    """The peers of the photo task whose libraries are importable, and why the others are missing."""
    want = {"opencv_sift": "cv2", "elastix_affine_bspline": "itk"}
    have, missing = {"identity": peers.RUNNERS["identity"]}, {}
    for name, module in want.items():
        if importlib.util.find_spec(module) is None:
            missing[name] = f"{module} not installed (pip install '.[bench]')"
        else:
            have[name] = peers.RUNNERS[name]
    have["optimize"] = ours("optimize", label="ours: optimize (LNCC)", dims=(2,), modalities=("mono",))
    have["optimize_mind"] = ours("optimize", options={"similarity": "mind"}, label="ours: optimize (MIND)",
                                 dims=(2,), modalities=("mono", "multi"))
    return have, missing


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["peer"]), []).append(r)
    out = []
    for (task, peer), rs in groups.items():
        errs = [r["mace"] if "mace" in r and math.isfinite(r["mace"]) else math.inf for r in rs]
        s = photos.score(errs, ACCEPT, AUC_AT)
        out.append({"task": task, "peer": peer, "cases": s.pop("n"), **s,
                    "seconds": float(np.mean([r["seconds"] for r in rs if "seconds" in r] or [np.nan]))})
    return out


def table(summary: list[dict[str, Any]], labels: dict[str, str]) -> str:
    acc = " | ".join(f"< {t:g} px" for t in ACCEPT)
    aucs = " | ".join(f"AUC@{t:g}" for t in AUC_AT)
    lines = [f"| variant | method | pairs (failed) | MACE mean (ok pairs) | median | max | {acc} | {aucs} | s/pair |",
             "|---|---|---|---|---|---|" + "---|" * (len(ACCEPT) + len(AUC_AT)) + "---|"]
    for s in summary:
        cells = [f"{s[f'acc<{t:g}']:.2f}" for t in ACCEPT] + [f"{s[f'auc@{t:g}']:.3f}" for t in AUC_AT]
        lines.append(f"| {s['task'].replace('photos_', '')} | {labels.get(s['peer'], s['peer'])} | {s['cases']} "
                     f"({s['failed']}) | {s['mace_mean']:.2f} | {s['mace_median']:.2f} | {s['mace_max']:.2f} | "
                     f"{' | '.join(cells)} | {s['seconds']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- model selection

def validate(paths: list[str], n: int = 48, threads: int = 1) -> list[dict[str, Any]]:
    """Mean MACE (px, 192 px images) of each checkpoint's network on ``n`` validation pairs."""
    import torch

    from napari_register import coords
    from napari_register.data.photos import make_pair, photo_names
    from napari_register.coords import px_from_norm
    from napari_register.methods.alto import build
    from napari_register.weights import load

    torch.set_num_threads(threads)
    names = photo_names("train")
    pairs = []
    for i in range(n):
        gen = torch.Generator().manual_seed(VALIDATION_SEED + i)
        pairs.append(make_pair(names[i % len(names)], gen, size=photos.PATCH, rho=photos.RHO, view=photos.SIZE,
                               modality=1.0 if i % 2 else 0.0, modes=("sine",)))
    corners = torch.from_numpy(photos.corners())
    ident = [float((corners - _apply(p.truth_matrix, corners)).norm(dim=1).mean()) for p in pairs]
    out = [{"checkpoint": "identity (no registration)", "steps": None, "mace_mean": float(np.mean(ident)),
            "mace_clean": float(np.mean(ident[0::2])), "mace_modality": float(np.mean(ident[1::2]))}]
    for path in paths:
        net, card = load(Path(path), "alto", 2, build)
        s = (net.size, net.size)
        errs = []
        with torch.no_grad():
            for p in pairs:
                m = net.matrix(coords.resize_image(p.moving, s), coords.resize_image(p.fixed, s))[0].double()
                h = px_from_norm(m, (photos.SIZE, photos.SIZE))
                errs.append(float((_apply(h, corners) - _apply(p.truth_matrix, corners)).norm(dim=1).mean()))
        out.append({"checkpoint": str(path), "steps": card.get("steps"), "mace_mean": float(np.mean(errs)),
                    "mace_median": float(np.median(errs)), "acc<3": float(np.mean(np.array(errs) < 3)),
                    "mace_clean": float(np.mean(errs[0::2])), "mace_modality": float(np.mean(errs[1::2])),
                    "acc<3_clean": float(np.mean(np.array(errs[0::2]) < 3)),
                    "acc<3_modality": float(np.mean(np.array(errs[1::2]) < 3))})
        print(out[-1], flush=True)
    return out


def _apply(h, pts):
    q = pts @ h[:2, :2].T + h[:2, 2]
    return q / (pts @ h[2, :2] + h[2, 2])[:, None]


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks alto_eval", description=__doc__.splitlines()[0])
    p.add_argument("--alto", action="append", default=[],
                   help="LABEL=CHECKPOINT (a shipped name or a path); repeat for several (default: alto=alto-2d)")
    p.add_argument("--io-steps", type=int, nargs="+", default=[0, 150],
                   help="AltO's instance-optimisation steps (MIND corner fit), one row each (default 0 150)")
    p.add_argument("--variants", nargs="+", default=["clean", "modality", "multimodal"], choices=sorted(photos.VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="case seeds (6 photos each)")
    p.add_argument("--peers", default="identity,optimize,optimize_mind,opencv_sift,elastix_affine_bspline",
                   help="comma-separated peers (those not installed are skipped and reported)")
    p.add_argument("--out", type=Path, help="run folder (default: a new benchmarks/results/<date>-alto-eval/)")
    p.add_argument("--select", nargs="+", help="only rank these checkpoints on validation pairs (see above)")
    p.add_argument("--validation-pairs", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.select:
        ranked = sorted(validate(args.select, args.validation_pairs, args.threads), key=lambda r: r["mace_mean"])
        for r in ranked:
            extra = (f"; median {r['mace_median']:.2f}, < 3 px {r['acc<3']:.0%} (clean {r['acc<3_clean']:.0%}, "
                     f"modality {r['acc<3_modality']:.0%})" if "acc<3" in r else "")
            print(f"{r['mace_mean']:7.2f} px (clean {r['mace_clean']:.2f}, modality {r['mace_modality']:.2f}{extra})  "
                  f"steps {r['steps']}  {r['checkpoint']}")
        return
    record = provenance("alto_eval", argv)
    have, missing = installed_peers()
    runners: dict[str, peers.Peer] = {}
    for spec in args.alto or ["alto=alto-2d"]:
        label, _, rest = spec.partition("=")
        ckpt, _, steps = rest.partition("@")
        if not ckpt:
            raise SystemExit(f"--alto wants LABEL=CHECKPOINT[@IO,IO...], got {spec!r}")
        for io in ([int(x) for x in steps.split(",")] if steps else args.io_steps):
            text = f"AltO ({label})" + (f" + corner fit {io}" if io else ", network")
            runners[f"alto:{label}:io{io}"] = ours("alto", io_steps=io, checkpoint=ckpt, dims=(2,), label=text,
                                                   modalities=("mono", "multi"))
    asked = [n for n in args.peers.split(",") if n]
    unknown = [n for n in asked if n not in have and n not in missing]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {sorted(have) + sorted(missing)}")
    runners.update({n: have[n] for n in asked if n in have})
    skipped = {n: missing[n] for n in asked if n in missing}
    peers.RUNNERS.update(runners)  # the harness looks runners up there
    labels = {n: r.label or n for n, r in runners.items()}
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        for seed in args.seeds:
            for pc in photos.cases(variant, seed=seed):
                pc.name = f"{pc.name}_s{seed}"
                pair = _photo_pair(pc)
                for name, runner in runners.items():
                    if not runner.applies(pair.case):
                        continue
                    r = peers.run_peer(name, pair)
                    _score_photo(r, pc)
                    rows.append({k: v for k, v in r.items() if isinstance(v, (int, float, str))})
                    print(pc.name, name, r.get("error", round(r.get("mace", float("nan")), 2)), flush=True)
    summary = summarise(rows)
    note = ("Peers not installed, so not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "."
            if skipped else "")
    out = args.out or new_run_dir("alto-eval")
    print(write_run(out, record, {"rows": rows, "summary": summary, "skipped_peers": skipped,
                                  "seeds": args.seeds, "variants": args.variants},
                    table(summary, labels), title="AltO on the photo homography task", note=note))


if __name__ == "__main__":
    main()
