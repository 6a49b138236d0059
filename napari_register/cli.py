"""Command line: ``napari-register register|demo|batch|train|methods`` (benchmarks: ``python -m benchmarks``).

``register`` is a contract other tools script against: it writes into ``--out``
``warped.<ext of fixed>``, ``warped_labels.<ext>`` (with labels), ``displacement.nii.gz`` (ITK
displacement field, mm, fixed grid), ``jacobian.nii.gz``, ``qa.png`` and ``metrics.json``.

Exit codes: 0 done; 2 bad input (a file, an option, a folder, too little memory: one line on
stderr says which and what to do); 3 an internal error (a bug: rerun with ``--debug`` for the
traceback and report it); 130 interrupted; ``batch``: 1 when it finished but some pairs failed
(each named on stderr and in ``summary.md``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 2, 3, 130


def run_register(args: argparse.Namespace) -> dict:
    from .outputs import PairFiles, register_to_folder

    pair = PairFiles(args.moving, args.fixed, args.moving_labels, args.fixed_labels, args.moving_points,
                     args.fixed_points)
    from .methods.registry import parse_options

    options = parse_options(args.options)
    shown = [False]  # a progress line is open on stderr (end it before any other line)

    def show(p) -> None:
        if p.message is not None:  # notes are shown even with --quiet: the run changed something
            print(f"\rnapari-register: note: {p.message}".ljust(60), file=sys.stderr, flush=True)
            shown[0] = False
        elif not args.quiet:
            print(f"\r{p}".ljust(60), end="", file=sys.stderr, flush=True)
            shown[0] = True

    try:
        metrics = register_to_folder(pair, Path(args.out), method=args.method, checkpoint=args.checkpoint,
                                     io_steps=args.io_steps, device=args.device, options=options, progress=show)
    finally:
        if shown[0]:
            print(file=sys.stderr)
    if not args.quiet:
        for w in metrics["outputs"]:
            print(Path(args.out) / w)
        print(json.dumps({k: v for k, v in metrics.items() if k in ("seconds", "fold_fraction", "dice_mean",
                                                                    "dice_mean_before", "tre_before", "tre_after")}))
    return metrics


def run_demo(args: argparse.Namespace) -> dict:
    s = Path(args.sample_dir)
    if not (s / "brain").exists():
        from .errors import MissingFileError

        raise MissingFileError(f"{s}: sample data not found; run from a clone of napari-register")
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
    debug_help = "on an error, print the full traceback (for bug reports)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # also after the command (napari-register register ... --debug); SUPPRESS keeps the global value
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[debug], **kw)

    r = command("register", help="register MOVING onto FIXED and write the results into --out",
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
    d = command("demo", help="register the shipped sample brain pair")
    _add_common(d)
    d.add_argument("--sample-dir", default=str(SAMPLE_DIR), help=argparse.SUPPRESS)
    command("methods", help="list the registered methods")
    from .batch import add_batch_arguments

    add_batch_arguments(command(
        "batch", help="register many pairs (a CSV, or --template T SUBJECTS...) on a Dask cluster",
        description="Register every pair of PAIRS_CSV (columns moving,fixed[,moving_labels,fixed_labels,"
        "moving_points,fixed_points,name]) or every SUBJECT onto --template, each into OUT/<name>/ with the "
        "outputs of `register`, then OUT/summary.csv, summary.md and summary.png. Finished pairs are skipped "
        "when rerun; a failed pair is reported and does not stop the others."))
    from .training import add_train_arguments

    add_train_arguments(command("train", help="train a method's network and save a checkpoint with its card"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)  # usage errors: argparse's message and exit code 2 (bad input)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("\nnapari-register: interrupted; no output was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every failure ends in one line and an exit code
        code = exit_code(e)
        if args.debug:
            import traceback

            traceback.print_exc()
        print(error_line(e, code), file=sys.stderr)
        return code


def exit_code(e: BaseException) -> int:
    """2 for what the user can fix (bad input, a file problem, too little memory), 3 for a bug.

    Plain ValueErrors count as bad input: across the code base (training's arguments too) they
    report a wrong value given by the user; our own input errors are :class:`InputError` ones."""
    from .errors import InputError

    if isinstance(e, (InputError, ValueError, OSError, MemoryError)):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def error_line(e: BaseException, code: int) -> str:
    """The one line printed for ``e``."""
    text = " ".join(str(e).split()) or type(e).__name__  # library messages can span lines
    if code == EXIT_BAD_INPUT:
        if isinstance(e, MemoryError):
            text = "out of memory; close other programs, downsample the images or use a machine with more memory"
        return f"napari-register: error: {text}"
    return (f"napari-register: internal error: {type(e).__name__}: {text} - this is a bug; rerun with --debug "
            "for the traceback and report it")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "register":
        run_register(args)
    elif args.command == "demo":
        run_demo(args)
    elif args.command == "methods":
        from .methods.registry import get_method, list_methods

        for name in list_methods():
            cls = get_method(name)
            print(f"{name:10s} {'/'.join(f'{d}D' for d in cls.dims):6s} {cls.description}")
    elif args.command == "batch":
        from .batch import run_batch

        return run_batch(args)
    elif args.command == "train":
        from .training.loop import train

        train(args)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
