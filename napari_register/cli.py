"""Command line: ``napari-register register|demo|batch|methods|train`` (benchmarks: ``python -m benchmarks``).

``register`` is a contract other tools script against: it writes into ``--out``
``warped.<ext of fixed>``, ``warped_labels.<ext>`` (with labels), ``displacement.nii.gz`` (ITK
displacement field, mm, fixed grid), ``jacobian.nii.gz``, ``qa.png`` and ``metrics.json``
(:mod:`napari_register.outputs`). Its standard output is the files written and a one-line JSON
summary (``--quiet``: the summary line only); stderr carries progress, notes, ``--profile``'s
breakdown and errors. ``--help`` shows :data:`DESCRIPTION` and :data:`EPILOG`; keep them in step.

Exit codes: 0 done; 2 bad input (a file, an option, a folder, too little memory: one line on
stderr says which and what to do); 3 an internal error (a bug: rerun with ``--debug`` for the
traceback and report it); 130 interrupted; ``batch``: 1 when it finished but some pairs failed
(each named on stderr and in ``summary.md``).

Nothing here imports torch at module level: ``--help`` stays quick (tests/test_cli.py checks it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 2, 3, 130
SUMMARY_KEYS = ("seconds", "fold_fraction", "dice_mean", "dice_mean_before", "tre_before", "tre_after")

DESCRIPTION = """\
Register a moving image onto a fixed one: 2D photos and slides, 3D volumes (NIfTI, MHA/MHD, NRRD,
DICOM folders, PNG/JPG/TIFF). Run `napari-register COMMAND --help` for a command's options.
"""
EPILOG = """\
register and demo write into --out: warped.<ext of fixed>, warped_labels.<ext> (with labels),
displacement.nii.gz (ITK displacement field in mm on the fixed grid), jacobian.nii.gz,
homography.txt (methods with a homography), qa.png and, last, metrics.json (absolute input
paths, Dice / TRE, timings). They print the files and a one-line JSON summary on stdout;
progress goes to stderr (--quiet: the summary line only; --profile: where the time went).

exit codes:
  0    done
  2    bad input (a file, an option, a folder, too little memory): one line on stderr says what
  3    internal error, a bug: rerun with --debug for the traceback and report it
  130  interrupted
  1    batch only: it finished, but some pairs failed (named on stderr and in summary.md)
"""


def since_process_start() -> Optional[float]:
    """Seconds since this process started (interpreter start-up and imports included); None where
    ``/proc`` does not say (not Linux)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class ProgressPrinter:
    """Shows a run's progress on ``stream``: on a terminal one line redrawn in place (``\\r``);
    elsewhere (a log file, CI) plain lines, at each new stage and then at most every
    :attr:`EVERY_FRACTION` of the run or :attr:`EVERY_SECONDS`. Notes are always shown (the run
    changed something on the user's behalf); ``quiet`` shows nothing else."""

    EVERY_FRACTION, EVERY_SECONDS = 0.05, 10.0
    REDRAW_SECONDS = 0.1  # a terminal line faster than this is flicker

    def __init__(self, method: str, device: str, quiet: bool = False, stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.method, self.device, self.quiet = method, device, quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.stage: Optional[str] = None
        self.shown_at, self.shown_fraction, self.width = -1e9, 0.0, 0
        self.open = False  # a terminal line is being redrawn: end it before any other line

    def __call__(self, p: Any) -> None:
        if p.message is not None:
            self.line(f"napari-register: note: {p.message}")
        elif self.quiet:
            return
        elif p.stage == "estimate":
            self.line(f"napari-register: {p} ({self.method}, {self._device(p)})")
        else:
            self._step(p)

    def _device(self, p: Any) -> str:
        if p.eta is not None:  # only the CPU has measured seconds (progress.seconds_scale)
            return "CPU"
        if self.device == "auto":
            import torch  # loaded by the pipeline by now

            return "CUDA" if torch.cuda.is_available() else "CPU"
        return self.device.split(":")[0].upper()

    def _step(self, p: Any) -> None:
        now, fraction = self.clock(), p.fraction or 0.0
        new_stage, last = p.stage != self.stage, p.stage == "done"
        self.stage = p.stage
        if self.tty:
            if not (new_stage or last or now - self.shown_at >= self.REDRAW_SECONDS):
                return
            text = self._text(p)
            self.stream.write("\r" + text.ljust(self.width))
            self.width, self.open = len(text), True
            if last:
                self.close()
        elif new_stage or last or fraction - self.shown_fraction >= self.EVERY_FRACTION \
                or now - self.shown_at >= self.EVERY_SECONDS:
            self.stream.write(self._text(p) + "\n")
        else:
            return
        self.stream.flush()
        self.shown_at, self.shown_fraction = now, fraction

    @staticmethod
    def _text(p: Any) -> str:
        # the registration is done, but the files take seconds more (a brain's: 50 MB compressed)
        return f"{p}, writing the outputs" if p.stage == "done" else str(p)

    def line(self, text: str) -> None:
        self.close()
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open, self.width = False, 0


def format_timings(timings: dict[str, float]) -> str:
    """``--profile``'s breakdown: one line per part, parts within a part (``"a: b"``) indented."""
    lines = ["napari-register: profile, seconds (the output files are written concurrently: their "
             "times overlap each other and the evaluation)"]
    for name, seconds in timings.items():
        parent, _, child = name.partition(": ")
        label = f"    {child}" if child else f"  {parent}"
        lines.append(f"{label:<46s}{seconds:8.3f}")
    return "\n".join(lines)


def run_register(args: argparse.Namespace) -> dict:
    from .outputs import PairFiles, Stopwatch, register_to_folder

    watch = Stopwatch({"start-up": time.perf_counter() - args.started})  # Python, imports, arguments
    pair = PairFiles(args.moving, args.fixed, args.moving_labels, args.fixed_labels, args.moving_points,
                     args.fixed_points)
    from .methods.registry import parse_options

    options = parse_options(args.options)
    show = ProgressPrinter(args.method, args.device, quiet=args.quiet)
    try:
        metrics = register_to_folder(pair, Path(args.out), method=args.method, checkpoint=args.checkpoint,
                                     io_steps=args.io_steps, device=args.device, options=options, progress=show,
                                     stopwatch=watch, prealign=getattr(args, "prealign", None))
    finally:
        show.close()
    if not args.quiet:
        for w in metrics["outputs"]:
            print(Path(args.out) / w)
    print(json.dumps({k: v for k, v in metrics.items() if k in SUMMARY_KEYS}), flush=True)
    if args.profile:
        print(format_timings(metrics["timings"]), file=sys.stderr)
    return metrics


def run_demo(args: argparse.Namespace) -> dict:
    s = Path(args.sample_dir)
    if not (s / "brain").exists():
        from .errors import MissingFileError

        raise MissingFileError(f"{s}: sample data not found; run from a clone of napari-register")
    b = s / "brain"
    return run_register(argparse.Namespace(**{
        **vars(args), "moving": str(b / "moving.nii.gz"), "fixed": str(b / "fixed.nii.gz"),
        "moving_labels": str(b / "moving_seg.nii.gz"), "fixed_labels": str(b / "fixed_seg.nii.gz"),
        "moving_points": None, "fixed_points": None, "options": None}))


def list_methods_table() -> str:
    """``napari-register methods``: each method's dimensions, shipped checkpoints and default IO
    steps on the CPU (and where the GPU's differ), then its description."""
    import torch

    from .methods.registry import get_method, list_methods
    from .weights import CHECKPOINT_DIR

    rows = [("method", "dims", "shipped checkpoints", "IO steps (CPU)", "description")]
    for name in list_methods():
        cls = get_method(name)
        shipped = sorted(p.stem for p in CHECKPOINT_DIR.glob(f"{name}-*.pt"))
        checkpoints = ", ".join(shipped) if shipped else ("none shipped" if cls.needs_checkpoint else "not needed")
        cpu, gpu = cls.io_steps_default(torch.device("cpu")), cls.io_steps_default(torch.device("cuda"))
        steps = str(cpu) if cpu == gpu else f"{cpu} (CUDA: {gpu})"
        rows.append((name, "/".join(f"{d}D" for d in cls.dims), checkpoints, steps, cls.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created; input files are never overwritten)")
    p.add_argument("--method", default="optimize",
                   help="registration method (see `napari-register methods`); default: optimize")
    p.add_argument("--checkpoint", default=None,
                   help="shipped checkpoint name (e.g. carl-3d) or a .pt path; default: the method's own")
    p.add_argument("--io-steps", type=int, default=None,
                   help="instance-optimisation steps on this pair after the method's result "
                        "(default: the method's, see `napari-register methods`)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto takes CUDA when present, else CPU")
    p.add_argument("--quiet", action="store_true",
                   help="no progress and no file list: stdout is the one-line JSON summary (notes and "
                        "errors still go to stderr)")
    p.add_argument("--profile", action="store_true",
                   help="after the run, print on stderr where the time went (start-up, reading, each "
                        "stage, each file); metrics.json has it as 'timings' in any case")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-register", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = "on an error, print the full traceback (for bug reports)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # also after the command (napari-register register ... --debug); SUPPRESS keeps the global value
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[debug], **kw)

    r = command("register", help="register MOVING onto FIXED and write the results into --out",
                description="Register MOVING onto FIXED (NIfTI, MHA/MHD/NRRD, DICOM folder, PNG/JPG/TIFF). "
                "Writes warped.<ext of fixed>, warped_labels.<ext>, displacement.nii.gz, jacobian.nii.gz, "
                "qa.png and metrics.json into --out; prints the files and a one-line JSON summary.")
    r.add_argument("moving", help="moving image (the one that is warped)")
    r.add_argument("fixed", help="fixed image (the reference grid of every output)")
    _add_common(r)
    r.add_argument("--moving-labels", help="label map of the moving image (integer map or channel-last masks)")
    r.add_argument("--fixed-labels", help="label map of the fixed image; with --moving-labels gives Dice")
    r.add_argument("--moving-points", help="CSV with header X,Y[,Z] (physical; pixels for photos)")
    r.add_argument("--fixed-points", help="CSV of the corresponding fixed points; with --moving-points gives TRE")
    r.add_argument("--options", help='method options as JSON, e.g. \'{"similarity": "mind"}\'')
    r.add_argument("--prealign", metavar="MATRIX.txt",
                   help="homography first, then --method: a moving_phys_from_fixed_phys matrix (e.g. the "
                        "homography.txt of an alto run) the moving image goes through before the method")
    d = command("demo", help="register the shipped sample brain pair into --out",
                description="Register the shipped sample brain pair (with its labels: Dice) into --out, "
                "with the outputs of `register`.")
    _add_common(d)
    d.add_argument("--sample-dir", default=str(SAMPLE_DIR), help=argparse.SUPPRESS)
    from .batch import add_batch_arguments

    add_batch_arguments(command(
        "batch", help="register many pairs (a CSV, or --template T SUBJECTS...) on a Dask cluster",
        description="Register every pair of PAIRS_CSV (columns moving,fixed[,moving_labels,fixed_labels,"
        "moving_points,fixed_points,name]) or every SUBJECT onto --template, each into OUT/<name>/ with the "
        "outputs of `register`, then OUT/summary.csv, summary.md and summary.png. Finished pairs are skipped "
        "when rerun; a failed pair is reported and does not stop the others."))
    command("methods", help="list the methods: dimensions, shipped checkpoints, default IO steps on the CPU")
    from .training import add_train_arguments

    add_train_arguments(command("train", help="train a method's network and save a checkpoint with its card"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    started = time.perf_counter()
    if argv is None:  # a real command: its time counts from the process's start (Python's own start-up)
        started -= since_process_start() or 0.0
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)  # usage errors: argparse's message and exit code 2 (bad input)
    args.started = started
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
        print(list_methods_table())
    elif args.command == "batch":
        from .batch import run_batch

        return run_batch(args)
    elif args.command == "train":
        from .training.loop import train

        train(args)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
