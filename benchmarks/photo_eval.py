"""Homography benchmark on held-out photos: MACE, acceptable rates and AUC, ours against OpenCV.

    python -m benchmarks photo_eval [--variants clean degraded modality] [--seeds 4] [--methods ...]

Cases: :func:`benchmarks.photos.cases` (the benchmark's photos and seeds, never trained on), each
variant ``len(PHOTOS) x seeds`` pairs. Per method: mean and median MACE (px, the patch's four
corners), the acceptable rate (share of pairs under 3 / 5 / 10 px; a failed pair counts as
unacceptable) and the AUC of the cumulative error curve up to 10 px (:func:`photos.score`). For a dense result the
homography fitted to it is scored (ART returns one); ``optimize``'s dense map is scored at the
corners. ``art`` is ART's network alone, ``art_fit`` the method's default (its fitted homography
refined on the pair), ``art_io`` the network fine-tuned on the pair; ``art_k<k>`` stops ART after
``k`` refinement steps (the step-efficiency curve); ``art_nocal`` is the same recipe trained
without cross-attention (``--ablation-checkpoint``); ``--art-snapshots`` adds rows for earlier
checkpoints (the learning curve). ``--validation`` runs the same protocol on the *training*
photos with other seeds: for choosing settings and checkpoints, never on a benchmark photo.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from benchmarks import new_run_dir, provenance, write_run
from benchmarks import photos

THRESHOLDS = (3.0, 5.0, 10.0)
Estimator = Callable[[photos.PhotoCase], Callable[[np.ndarray], np.ndarray]]


def _opencv(detector: str, robust: str = "ransac") -> Estimator:
    def run(pc: photos.PhotoCase) -> Callable[[np.ndarray], np.ndarray]:
        import cv2

        def u8(a: np.ndarray) -> np.ndarray:
            return np.uint8(np.clip(255 * (a - a.min()) / max(float(np.ptp(a)), 1e-6), 0, 255))

        det = {"sift": lambda: cv2.SIFT_create(), "orb": lambda: cv2.ORB_create(2000),
               "akaze": lambda: cv2.AKAZE_create()}[detector]()
        kf, df = det.detectAndCompute(u8(pc.fixed), None)
        km, dm = det.detectAndCompute(u8(pc.moving), None)
        if df is None or dm is None or len(kf) < 4 or len(km) < 4:
            raise RuntimeError("too few keypoints")
        norm = cv2.NORM_L2 if detector == "sift" else cv2.NORM_HAMMING
        matches = [m for m, n in (p for p in cv2.BFMatcher(norm).knnMatch(df, dm, k=2) if len(p) == 2)
                   if m.distance < 0.75 * n.distance]
        if len(matches) < 4:
            raise RuntimeError(f"{len(matches)} matches")
        src = np.float32([kf[m.queryIdx].pt for m in matches])
        dst = np.float32([km[m.trainIdx].pt for m in matches])
        method = cv2.USAC_MAGSAC if robust == "magsac" else cv2.RANSAC
        h, inliers = cv2.findHomography(src, dst, method, 3.0)
        if h is None or int(inliers.sum()) < 10:
            raise RuntimeError("no homography with 10 inliers")
        return lambda pts: _apply(h, pts)

    return run


def _apply(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    q = np.c_[pts, np.ones(len(pts))] @ h.T
    return q[:, :2] / q[:, 2:]


def _ours(method: str, checkpoint: Optional[str] = None, io_steps: int = 0,
          options: Optional[dict[str, Any]] = None) -> Estimator:
    def run(pc: photos.PhotoCase) -> Callable[[np.ndarray], np.ndarray]:
        from napari_register import register
        from napari_register.coords import Geometry
        from napari_register.image import Image

        g = Geometry(pc.fixed.shape, (1.0, 1.0), (0.0, 0.0), np.eye(2))
        result = register(Image(pc.moving, g), Image(pc.fixed, g), method=method, checkpoint=checkpoint,
                          io_steps=io_steps, options=options, device="cpu")
        tx = result.homography if result.homography is not None else result.transform
        return lambda pts: tx.moving_from_fixed(np.asarray(pts, np.float64))

    return run


def estimators(args: argparse.Namespace) -> dict[str, Estimator]:
    out: dict[str, Estimator] = {"identity": lambda pc: (lambda pts: pts)}
    try:
        import cv2

        out.update({"opencv_sift": _opencv("sift"), "opencv_sift_magsac": _opencv("sift", "magsac"),
                    "opencv_orb": _opencv("orb")})
        if hasattr(cv2, "AKAZE_create"):  # not in every OpenCV build (5.x moved it out)
            out["opencv_akaze"] = _opencv("akaze")
    except ImportError:
        print("OpenCV is not installed (pip install -e '.[bench]'): its rows are left out")
    out["optimize"] = _ours("optimize")
    out["optimize_mind"] = _ours("optimize", options={"similarity": "mind"})
    from napari_register.methods.registry import list_methods

    if "art" in list_methods(2):
        net = {"fit_steps": 0}  # the network alone (the default refines its homography on the pair)
        out["art"] = _ours("art", args.art_checkpoint, options=net)
        out["art_io"] = _ours("art", args.art_checkpoint, io_steps=args.io_steps, options=net)
        out["art_fit"] = _ours("art", args.art_checkpoint, options=args.art_options)
        for k in args.art_steps:
            out[f"art_k{k}"] = _ours("art", args.art_checkpoint, options={"steps": k, **net})
        if args.ablation_checkpoint:
            out["art_nocal"] = _ours("art", args.ablation_checkpoint, options=net)
        for path in args.art_snapshots:  # the learning curve: earlier checkpoints of one run
            out[f"art@{Path(path).stem}"] = _ours("art", path, options=net)
            out[f"art_fit@{Path(path).stem}"] = _ours("art", path, options=args.art_options)
    if "alto" in list_methods(2):
        out["alto"] = _ours("alto", args.alto_checkpoint)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks photo_eval", description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["clean", "degraded", "modality"])
    ap.add_argument("--seeds", type=int, default=4, help="cases per photo and variant")
    ap.add_argument("--methods", nargs="+", help="only these (default: every one available)")
    ap.add_argument("--art-checkpoint", help="ART checkpoint (default: the shipped art-2d)")
    ap.add_argument("--ablation-checkpoint", help="ART trained without cross-attention")
    ap.add_argument("--alto-checkpoint", help="AltO checkpoint (default: the shipped alto-2d)")
    ap.add_argument("--art-steps", type=int, nargs="*", default=[1, 2], help="step-efficiency rows: stop after k")
    ap.add_argument("--io-steps", type=int, default=20, help="instance-optimisation steps of art_io")
    ap.add_argument("--art-snapshots", nargs="*", default=[],
                    help="earlier checkpoints of the ART run (rows art@<name>, art_fit@<name>: the learning curve)")
    ap.add_argument("--validation", action="store_true",
                    help="training photos and seeds instead of the benchmark's (for choosing settings)")
    ap.add_argument("--art-options", type=json.loads, default={},
                    help="ART options of the art_fit row (the default method) as JSON, e.g. '{\"fit_blur\": 4}'")
    ap.add_argument("--out", help="run folder (default: a new benchmarks/results/<date>-photo-eval)")
    args = ap.parse_args(argv)
    record = provenance("photo_eval", argv)
    methods = estimators(args)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods or "@" in k}
    out = Path(args.out) if args.out else new_run_dir("photo-eval")
    errors: dict[str, dict[str, list[float]]] = {v: {m: [] for m in methods} for v in args.variants}
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    failures: list[str] = []
    for variant in args.variants:
        for seed in range(args.seeds):
            for pc in photos.cases(variant, seed=seed, validation=args.validation):
                for name, make in methods.items():
                    t0 = time.perf_counter()
                    try:
                        err = photos.mace(make(pc), pc.truth)
                    except Exception as e:  # noqa: BLE001 - a failed pair is a result
                        err = float("inf")
                        failures.append(f"{variant} {pc.name} seed {seed} {name}: {type(e).__name__}: {e}")
                    seconds[name].append(time.perf_counter() - t0)
                    errors[variant][name].append(err)
            print(variant, seed, {m: round(float(np.mean(np.minimum(v[-6:], 99))), 1) for m, v in errors[variant].items()},
                  flush=True)
    table = {v: {m: photos.score(e, THRESHOLDS) for m, e in ms.items()} for v, ms in errors.items()}
    lines = []
    for v, rows in table.items():
        pairs = len(next(iter(errors[v].values()), []))
        lines += [f"## {v} ({pairs} pairs: {pairs // max(args.seeds, 1)} {'training' if args.validation else 'held-out'} "
                  f"photos x {args.seeds} seeds)", "",
                  "| method | MACE mean (px) | median | < 3 px | < 5 px | < 10 px | AUC@10 | failed | s / pair |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, s in rows.items():
            lines.append(f"| {m} | {s['mace_mean']:.2f} | {s['mace_median']:.2f} | {100 * s['acc<3']:.0f} % | "
                         f"{100 * s['acc<5']:.0f} % | {100 * s['acc<10']:.0f} % | {s['auc@10']:.3f} | "
                         f"{s['failed']} | {np.mean(seconds[m]):.2f} |")
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    _plot(errors, out / "error_curves.png")
    figures = "\n![cumulative error curves](error_curves.png)\n"
    steps = _step_rows(table, _art_steps(args.art_checkpoint))
    if steps:
        lines += ["## ART's step efficiency (refinement steps k; the last is the full network)", "",
                  "| variant | " + " | ".join(f"k = {k}" for k in steps) + " | no cross-attention |",
                  "|---|" + "---|" * (len(steps) + 1)]
        for v, rows in table.items():
            nocal = rows.get("art_nocal")
            lines.append(f"| {v} (MACE mean / median px) | " + " | ".join(
                f"{rows[m]['mace_mean']:.2f} / {rows[m]['mace_median']:.2f}" for m in steps.values()) +
                (f" | {nocal['mace_mean']:.2f} / {nocal['mace_median']:.2f} |" if nocal else " | - |"))
        lines.append("")
        _plot_steps(table, steps, out / "art_steps.png")
        figures += "![ART step efficiency](art_steps.png)\n"
    write_run(out, record, {"scores": table, "errors": errors, "seconds": seconds, "failures": failures},
              "\n".join(lines) + figures,
              title="Homography on held-out photos: MACE, acceptable rate, AUC")
    print("\n".join(lines))
    return 0


def _art_steps(checkpoint: Optional[str]) -> int:
    """K of an ART checkpoint (``12 * 2^K`` = its size), from its card."""
    from napari_register import weights
    from napari_register.methods.art import START

    card = weights.read_card(weights.resolve(checkpoint, "art-2d")) or {}
    return int(round(np.log2(card.get("config", {}).get("size", 96) / START)))


def _step_rows(table: dict[str, dict[str, dict]], full: int) -> dict[int, str]:
    """``{k: row}`` of ART's step-efficiency rows: ``art_k<k>``, and ``art`` as the full ``K``."""
    rows = next(iter(table.values()), {})
    out = {int(m[5:]): m for m in rows if m.startswith("art_k") and int(m[5:]) < full}
    if not out or "art" not in rows:
        return {}
    return dict(sorted({**out, full: "art"}.items()))


def _plot_steps(table: dict[str, dict[str, dict]], steps: dict[int, str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for v, rows in table.items():
        line = ax.plot(list(steps), [rows[m]["mace_median"] for m in steps.values()], "o-", label=f"{v}, ART")[0]
        if "art_nocal" in rows:
            ax.axhline(rows["art_nocal"]["mace_median"], ls="--", color=line.get_color(), lw=1,
                       label=f"{v}, no cross-attention")
        if "identity" in rows:
            ax.axhline(rows["identity"]["mace_median"], ls=":", color=line.get_color(), lw=1)
    ax.set_xlabel("refinement steps k (fields 12 x 2^k)")
    ax.set_ylabel("median MACE (px); dotted: unregistered")
    ax.set_xticks(list(steps))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot(errors: dict[str, dict[str, list[float]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(errors), 3.6))
    FigureCanvasAgg(fig)
    t = np.linspace(0, 20, 201)
    for i, (variant, methods) in enumerate(errors.items()):
        ax = fig.add_subplot(1, len(errors), i + 1)
        for m, e in methods.items():
            e = np.asarray(e)
            ax.plot(t, [(e < x).mean() for x in t], label=m, lw=1.2)
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("MACE threshold (px)")
        ax.set_ylabel("share of pairs below")
        ax.grid(alpha=0.3)
    fig.axes[-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
