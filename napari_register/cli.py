"""Command line: ``napari-register register|demo|train|methods`` (benchmarks: ``python -m benchmarks``).

``register`` is a contract other tools script against: it writes into ``--out``
``warped.<ext of fixed>``, ``warped_labels.<ext>`` (with labels), ``displacement.nii.gz`` (ITK
displacement field, mm, fixed grid), ``jacobian.nii.gz``, ``qa.png`` and ``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"


def _labels_like(path: str, image) -> Any:
    """Read a label map and give it its image's geometry when the grids match voxel for voxel
    (some label headers carry a slightly different spacing, e.g. the OASIS pair)."""
    from .image import Image, ImageError, read_image

    lab = read_image(path, labels=True)
    if lab.shape != image.shape:
        raise ImageError(f"{path}: label grid {lab.shape} does not match its image {image.name} {image.shape}; "
                         "labels must be drawn on the image's own voxel grid")
    return Image(lab.array, image.geometry, channels=lab.channels, path=lab.path)


def _out_ext(fixed_path: str) -> str:
    name = Path(fixed_path).name.lower()
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        if name.endswith(ext):
            return ".mha" if ext == ".mhd" else ext
    return ".nii.gz"  # DICOM folders and anything else


def _dice(warped, fixed_labels) -> dict[str, float]:
    from .metrics import dice, dice_channels

    if fixed_labels.channels:
        values = dice_channels(warped.array > 0.5, fixed_labels.array > 0.5)
        return {str(i): float(v) for i, v in enumerate(values)}
    return {str(k): float(v) for k, v in dice(warped.array, fixed_labels.array).items()}


def run_register(args: argparse.Namespace) -> dict:
    from .api import register
    from .image import read_image, read_points, write_image
    from .qa import qa_figure

    out = Path(args.out)
    inputs = tuple(str(Path(p).resolve()) for p in (args.moving, args.fixed, args.moving_labels, args.fixed_labels,
                                                    args.moving_points, args.fixed_points) if p)
    if str(out.resolve()) in inputs or any(Path(p).parent == out.resolve() and Path(p).name.startswith(
            ("warped", "displacement", "jacobian", "qa.png", "metrics.json")) for p in inputs):
        raise ValueError(f"--out {out}: would overwrite an input file; choose another output folder")
    moving = read_image(args.moving)
    fixed = read_image(args.fixed)
    options = json.loads(args.options) if args.options else None

    def show(p) -> None:
        if not args.quiet:
            print(f"\r{p}".ljust(60), end="", file=sys.stderr, flush=True)

    result = register(moving, fixed, method=args.method, checkpoint=args.checkpoint, io_steps=args.io_steps,
                      device=args.device, progress=show, options=options)
    if not args.quiet:
        print(file=sys.stderr)
    ext = _out_ext(args.fixed)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_image(result.warped, out / f"warped{ext}", protect=inputs)]
    written.append(result.field.save(out / "displacement.nii.gz"))
    written.append(write_image(result.jacobian, out / "jacobian.nii.gz", protect=inputs))
    metrics: dict[str, Any] = {
        "method": result.method, "checkpoint": result.checkpoint, "io_steps": result.io_steps,
        "device": result.device, "seconds": round(result.seconds, 3), "fold_fraction": result.fold_fraction,
        "moving": str(args.moving), "fixed": str(args.fixed),
    }
    if args.moving_labels:
        mlab = _labels_like(args.moving_labels, moving)
        wl = result.warp_labels(mlab)
        written.append(write_image(wl, out / f"warped_labels{ext if ext not in ('.jpg', '.jpeg') else '.png'}",
                                   protect=inputs))
        if args.fixed_labels:
            flab = _labels_like(args.fixed_labels, fixed)
            per = _dice(wl, flab)
            before = _dice(_warp_identity(mlab, fixed), flab)
            metrics["dice"] = per
            metrics["dice_mean"] = float(np.nanmean(list(per.values()))) if per else float("nan")
            metrics["dice_before"] = before
            metrics["dice_mean_before"] = float(np.nanmean(list(before.values()))) if before else float("nan")
    if args.moving_points and args.fixed_points:
        from .metrics import tre

        mp = read_points(args.moving_points, fixed.ndim)
        fp = read_points(args.fixed_points, fixed.ndim)
        if mp.shape != fp.shape:
            raise ValueError(f"--moving-points has {len(mp)} points but --fixed-points has {len(fp)}; "
                             "they must list corresponding points in the same order")
        metrics["tre_before"] = tre(fp, mp)["mean"]
        metrics["tre_after"] = tre(result.map_points(fp), mp)["mean"]
        metrics["tre_after_max"] = tre(result.map_points(fp), mp)["max"]
    spacing = fixed.geometry.spacing
    qa_figure(fixed.luminance(), result.warped.luminance(), result.field.disp_vox(),  # it normalises
              result.jacobian.array, out / "qa.png",
              title=f"{result.method}: folds {100 * result.fold_fraction:.3f}%"
              + (f", Dice {metrics['dice_mean']:.3f}" if "dice_mean" in metrics else ""), spacing_xyz=spacing)
    written.append(out / "qa.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    written.append(out / "metrics.json")
    if not args.quiet:
        for w in written:
            print(w)
        print(json.dumps({k: v for k, v in metrics.items() if k in ("seconds", "fold_fraction", "dice_mean",
                                                                    "dice_mean_before", "tre_before", "tre_after")}))
    return metrics


def _warp_identity(labels, fixed):
    from .transforms import MatrixTransform, warp_image

    return warp_image(labels, MatrixTransform(np.eye(fixed.ndim + 1)), fixed.geometry, labels=True)


def run_demo(args: argparse.Namespace) -> dict:
    s = Path(args.sample_dir)
    if not (s / "brain").exists():
        raise FileNotFoundError(f"{s}: sample data not found; run from a clone of napari-register")
    ns = argparse.Namespace(
        moving=str(s / "brain/moving.nii.gz"), fixed=str(s / "brain/fixed.nii.gz"), out=args.out,
        method=args.method, checkpoint=args.checkpoint, io_steps=args.io_steps, device=args.device,
        moving_labels=str(s / "brain/moving_seg.nii.gz"), fixed_labels=str(s / "brain/fixed_seg.nii.gz"),
        moving_points=None, fixed_points=None, options=None, quiet=args.quiet)
    return run_register(ns)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created; input files are never overwritten)")
    p.add_argument("--method", default="optimize",
                   help="registration method (see `napari-register methods`); default: optimize")
    p.add_argument("--checkpoint", default=None,
                   help="shipped checkpoint name (e.g. carl-3d) or a .pt path; default: the method's own")
    p.add_argument("--io-steps", type=int, default=None,
                   help="instance-optimisation steps on this pair after the method's result (default: method's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto takes CUDA when present, else CPU")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="register MOVING onto FIXED and write the results into --out",
                       description="Register MOVING onto FIXED (NIfTI, MHA/MHD/NRRD, DICOM folder, PNG/JPG/TIFF). "
                       "Writes warped.<ext of fixed>, warped_labels.<ext>, displacement.nii.gz, jacobian.nii.gz, "
                       "qa.png and metrics.json into --out.")
    r.add_argument("moving", help="moving image (the one that is warped)")
    r.add_argument("fixed", help="fixed image (the reference grid of every output)")
    _add_common(r)
    r.add_argument("--moving-labels", help="label map of the moving image (integer map or channel-last masks)")
    r.add_argument("--fixed-labels", help="label map of the fixed image; with --moving-labels gives Dice")
    r.add_argument("--moving-points", help="CSV with header X,Y[,Z] (physical; pixels for photos)")
    r.add_argument("--fixed-points", help="CSV of the corresponding fixed points; with --moving-points gives TRE")
    r.add_argument("--options", help='method options as JSON, e.g. \'{"similarity": "mind"}\'')
    d = sub.add_parser("demo", help="register the shipped sample brain pair")
    _add_common(d)
    d.add_argument("--sample-dir", default=str(SAMPLE_DIR), help=argparse.SUPPRESS)
    sub.add_parser("methods", help="list the registered methods")
    from .training import add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train a method's network and save a checkpoint with its card"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "register":
            run_register(args)
        elif args.command == "demo":
            run_demo(args)
        elif args.command == "methods":
            from .methods.registry import get_method, list_methods

            for name in list_methods():
                cls = get_method(name)
                print(f"{name:10s} {'/'.join(f'{d}D' for d in cls.dims):6s} {cls.description}")
        elif args.command == "train":
            from .training.loop import train

            train(args)
        return 0
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"napari-register: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
