"""Register one pair of files and write the contract outputs into a folder: the CLI's ``register``
and ``demo`` and every pair of ``batch`` go through :func:`register_to_folder`.

Into ``out``: ``warped.<ext of fixed>``, ``warped_labels.<ext>`` (with labels),
``displacement.nii.gz`` (ITK displacement field, mm, fixed grid), ``jacobian.nii.gz``,
``homography.txt`` (methods with a homography: moving_phys_from_fixed_phys, 3x3), ``qa.png``
and, last, ``metrics.json`` with ``"status": "done"``. Every file is written under a temporary
name and renamed, so a failed or cancelled run never leaves a half-written file under a real name,
and a folder whose ``metrics.json`` says done holds every output. Input files are never written.

``metrics.json`` records every input given (``moving``, ``fixed``, ``moving_labels``, ...) as its
resolved absolute path, whatever form it was given in, and ``timings``: seconds by part of the run,
in order (``"registration: <stage>"`` and ``"outputs: <file>"`` are parts within a part; the files are
written concurrently, so their times overlap), ending with ``total``.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import InputError, OutputError, output_error

OUTPUT_PREFIXES = ("warped", "displacement", "jacobian", "homography", "qa.png", "metrics.json")


@dataclass(frozen=True)
class PairFiles:
    """The files of one registration problem (labels and points optional)."""

    moving: str
    fixed: str
    moving_labels: Optional[str] = None
    fixed_labels: Optional[str] = None
    moving_points: Optional[str] = None
    fixed_points: Optional[str] = None

    def resolved(self) -> dict[str, str]:
        """The files given, by role, as absolute paths (what ``metrics.json`` records)."""
        return {role: str(Path(p).resolve()) for role, p in asdict(self).items() if p}

    def inputs(self) -> tuple[str, ...]:
        return tuple(self.resolved().values())


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final`` (same suffixes, so writers pick the same format), renamed
    onto ``final`` when the block succeeds and removed when it fails."""
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would make the outputs private to the user
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def is_done(out: Path) -> bool:
    """Whether ``out`` holds a finished run (its ``metrics.json`` says done)."""
    try:
        return json.loads((Path(out) / "metrics.json").read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


def out_ext(fixed_path: str) -> str:
    """The fixed image's own format for the warped image (``.mhd`` headers as one ``.mha`` file)."""
    from .image import ITK_EXT, NIFTI_EXT, PHOTO_EXT, file_suffix

    ext = file_suffix(Path(fixed_path))
    if ext not in NIFTI_EXT + ITK_EXT + PHOTO_EXT:
        return ".nii.gz"  # DICOM folders
    return ".mha" if ext == ".mhd" else ext


def labels_like(path: str, image: Any, role: str = "") -> Any:
    """Read a label map and give it its image's geometry when the grids match voxel for voxel
    (some label headers carry a slightly different spacing, e.g. the OASIS pair). A map on another
    grid, or without any label, is refused."""
    from .image import Image, ImageError, check_labels, read_image

    lab = read_image(path, labels=True)
    if lab.shape != image.shape:
        raise ImageError(f"{path}: label grid {lab.shape} does not match its image {image.name} {image.shape}; "
                         "labels must be drawn on the image's own voxel grid (resample them onto it first)")
    check_labels(lab, role)
    return Image(lab.array, image.geometry, channels=lab.channels, path=lab.path)


def _prepare_folder(out: Path) -> None:
    """Create ``out`` and make sure a file can be written there, before the run (not after it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
        (out / "metrics.json").unlink(missing_ok=True)  # a stale "done" must not outlive a rewrite
    except OSError as e:
        raise output_error(e, out) from None


def _dice(warped: Any, fixed_labels: Any) -> dict[str, float]:
    from .metrics import dice, dice_channels

    if fixed_labels.channels:
        values = dice_channels(warped.array > 0.5, fixed_labels.array > 0.5)
        return {str(i): float(v) for i, v in enumerate(values)}
    return {str(k): float(v) for k, v in dice(warped.array, fixed_labels.array).items()}


def on_fixed_grid(image: Any, fixed: Any, labels: bool = False) -> Any:
    """``image`` (moving) on the fixed grid as it is, before registering (Dice before, the QA's
    *before* column): resampled through the identity in physical space, or itself when both share
    one grid (nearest neighbour then gives the map itself; linear, the values within float32's rounding)."""
    import numpy as np

    g, f = image.geometry, fixed.geometry
    if g == f and np.array_equal(g.direction, f.direction):  # Geometry's == leaves direction out
        return image
    from .transforms import MatrixTransform, warp_image

    return warp_image(image, MatrixTransform(np.eye(fixed.ndim + 1)), fixed.geometry, labels=labels)


def gzip_rle(path: Path, write_raw: Callable[[Path], Any]) -> None:
    """Write the gzip file ``path`` as ``write_raw`` writes it uncompressed (an uncompressed ``.nii``
    beside it), deflated with zlib's run-length strategy. Float32 fields (displacement, Jacobian)
    barely compress by string matching: run-length + Huffman coding gives the same size as the
    writers' own gzip (within 1 %) for a third of the compression's CPU time (a brain's 53 MB field:
    the whole write 1.9 -> 0.9 s of CPU), and the decompressed bytes are the writer's own."""
    # named after the output, so a leftover (or an error about it) says which file it was
    stem = path.name.lstrip(".").split(".")[0]  # "jacobian" also from atomic_path's ".jacobian.x.nii.gz"
    fd, name = tempfile.mkstemp(prefix=f".{stem}.raw.", suffix=".nii", dir=path.parent)
    os.close(fd)
    raw = Path(name)
    try:
        write_raw(raw)
        deflate = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_RLE)  # 16+: a gzip header
        with open(raw, "rb") as src, open(path, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 24), b""):
                dst.write(deflate.compress(chunk))  # zlib works outside the GIL: other writes go on
            dst.write(deflate.flush())
    finally:
        raw.unlink(missing_ok=True)


class Stopwatch:
    """Seconds by part of a run, in order (``metrics.json``'s ``timings``; ``"a: b"`` is ``b`` within
    ``a``). ``before``: parts measured before it started (the command line's start-up)."""

    def __init__(self, before: Optional[dict[str, float]] = None) -> None:
        self.parts: dict[str, float] = dict(before or {})
        self.earlier = sum(s for k, s in self.parts.items() if ": " not in k)
        self.start = self.mark = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    def lap(self, name: str) -> None:
        """The time since the last lap is part ``name``."""
        now = time.perf_counter()
        self.add(name, now - self.mark)
        self.mark = now

    def result(self) -> dict[str, float]:
        """The parts and ``total`` (start-up included), rounded to milliseconds."""
        total = self.earlier + time.perf_counter() - self.start
        return {k: round(s, 3) for k, s in {**self.parts, "total": total}.items()}


def _import_matplotlib() -> None:
    import importlib

    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        importlib.import_module(name)


class Writes:
    """Writes output files atomically (see :func:`atomic_path`), each in a thread of its own: zlib,
    ITK, torch and PNG encoding work outside the GIL, so the big fields' compression overlaps the
    label warps, Dice and the QA picture, and matplotlib's import (1 s) overlaps all of them.
    :meth:`wait` returns each file's seconds and raises the first failure."""

    THREADS = 8  # one per file, so that none waits behind another: a few at most are busy at once

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="napari-register-write")
        self.pool.submit(_import_matplotlib)  # for the QA picture; a failure shows when it is drawn
        self.jobs: list[tuple[str, Future]] = []

    def submit(self, name: str, writer: Callable[[Path], Any]) -> None:
        self.jobs.append((name, self.pool.submit(self.write, name, writer)))

    def write(self, name: str, writer: Callable[[Path], Any]) -> float:
        """Write ``out/name`` now; returns the seconds it took."""
        start = time.perf_counter()
        try:
            with atomic_path(self.out / name) as tmp:
                writer(tmp)
        except OSError as e:  # full disk, permissions: say which file and what to do
            raise output_error(e, self.out / name) from None
        return time.perf_counter() - start

    def wait(self) -> dict[str, float]:
        try:
            return {name: job.result() for name, job in self.jobs}
        finally:
            self.close()

    def close(self) -> None:
        """Drop the writes not started; those under way finish (each is atomic)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def register_to_folder(pair: PairFiles, out: Path, *, method: Any = "optimize", checkpoint: Optional[str] = None,
                       io_steps: Optional[int] = None, device: str = "auto", options: Optional[dict] = None,
                       progress: Optional[Callable[[Any], None]] = None,
                       stopwatch: Optional["Stopwatch"] = None, prealign: Optional[str] = None) -> dict[str, Any]:
    """Register ``pair`` and write its outputs into ``out``; returns the metrics (also in
    ``metrics.json``). ``method``: a name, a method instance to reuse (a loaded network), or a
    function ``dim -> method instance`` (the images' dimensionality is known once they are read).
    ``stopwatch``: one started earlier (by the command line, with its start-up), so that the
    ``timings`` of the metrics cover the whole command. ``prealign``: a matrix file (e.g. a
    homography run's ``homography.txt``) the moving image goes through first ("homography first,
    then deformable")."""
    watch = stopwatch or Stopwatch()
    import numpy as np

    from .api import register
    from .image import read_image, write_image
    from .points import read_points
    from .metrics import tre
    from .qa_figure import qa_figure

    watch.lap("imports")
    out = Path(out)
    inputs = (*pair.inputs(), *([str(Path(prealign).resolve())] if prealign else []))
    clash = [p for p in inputs if p == str(out.resolve()) or (Path(p).parent == out.resolve()
                                                             and Path(p).name.startswith(OUTPUT_PREFIXES))]
    if clash:
        raise OutputError(f"--out {out}: would overwrite the input {clash[0]}; choose another output folder")
    # every input is read and checked before the (long) run, so a bad label map or points file
    # is reported at once, not after the registration
    moving, fixed = read_image(pair.moving), read_image(pair.fixed)
    mlab = labels_like(pair.moving_labels, moving, "moving") if pair.moving_labels else None
    flab = labels_like(pair.fixed_labels, fixed, "fixed") if pair.moving_labels and pair.fixed_labels else None
    mp = fp = None
    if pair.moving_points and pair.fixed_points:
        mp, fp = read_points(pair.moving_points, fixed.ndim), read_points(pair.fixed_points, fixed.ndim)
        if mp.shape != fp.shape:
            raise InputError(f"--moving-points {pair.moving_points} has {len(mp)} points but --fixed-points "
                             f"{pair.fixed_points} has {len(fp)}; they must list corresponding points in the "
                             "same order")
    pre = None
    if prealign is not None:
        from .transforms import MatrixTransform

        pre = MatrixTransform.load_txt(prealign, fixed.ndim)
    watch.lap("read inputs")
    _prepare_folder(out)
    if callable(method):
        method = method(fixed.ndim)
    result = register(moving, fixed, method=method, checkpoint=checkpoint, io_steps=io_steps, device=device,
                      progress=progress, options=options, prealign=pre)
    watch.lap("registration")
    # before the first stage: the method (a network's checkpoint), the memory plan, the estimate
    watch.add("registration: set-up", watch.parts["registration"] - sum(s for _, s in result.timings))
    for label, seconds in result.timings:
        watch.add(f"registration: {label}", seconds)
    ext = out_ext(pair.fixed)
    written: list[str] = []
    writes = Writes(out)

    def write(name: str, writer: Callable[[Path], Any]) -> None:
        writes.submit(name, writer)
        written.append(name)

    # written while this thread warps the labels, computes Dice and the QA picture's inputs
    write(f"warped{ext}", lambda p: write_image(result.warped, p, protect=inputs))
    write("displacement.nii.gz", lambda p: gzip_rle(p, result.field.save))
    write("jacobian.nii.gz", lambda p: gzip_rle(p, lambda raw: write_image(result.jacobian, raw, protect=inputs)))
    if result.matrix is not None:  # a homography (the result itself, or fitted to it), as 3x3 text
        from .transforms import MatrixTransform

        write("homography.txt", MatrixTransform(result.matrix).save_txt)
    metrics: dict[str, Any] = {
        "method": result.method, "checkpoint": result.checkpoint, "io_steps": result.io_steps,
        "device": result.device, "seconds": round(result.seconds, 3), "fold_fraction": result.fold_fraction,
        **pair.resolved(),
    }
    if prealign is not None:
        metrics["prealign"] = str(Path(prealign).resolve())
    if result.quality:  # the start-against-result check (api.check_result)
        metrics["quality"] = dict(result.quality)
    if result.notes:
        metrics["notes"] = list(result.notes)
    if mlab is not None:
        wl = result.warp_labels(mlab)
        write(f"warped_labels{ext if ext not in ('.jpg', '.jpeg') else '.png'}",
              lambda p: write_image(wl, p, protect=inputs))
        if flab is not None:
            per, per_before = _dice(wl, flab), _dice(on_fixed_grid(mlab, fixed, labels=True), flab)
            metrics["dice"] = per
            metrics["dice_mean"] = float(np.nanmean(list(per.values()))) if per else float("nan")
            metrics["dice_before"] = per_before
            metrics["dice_mean_before"] = (float(np.nanmean(list(per_before.values()))) if per_before
                                           else float("nan"))
    if mp is not None and fp is not None:
        metrics["tre_before"] = tre(fp, mp)["mean"]
        after = tre(result.map_points(fp), mp)
        metrics["tre_after"], metrics["tre_after_max"] = after["mean"], after["max"]
    from .image import PHOTO_EXT
    from .qa_figure import qa_title

    before = on_fixed_grid(moving, fixed).luminance()  # the figure's "before" column
    title = qa_title(metrics, unit="px" if ext in PHOTO_EXT else "mm")  # photos: unit spacing, so pixels
    write("qa.png", lambda p: qa_figure(fixed.luminance(), result.warped.luminance(), result.field.disp_vox(),
                                        result.jacobian.array, p, title=title, spacing_xyz=fixed.geometry.spacing,
                                        moving_before=before))
    metrics["outputs"] = written + ["metrics.json"]
    metrics["status"] = "done"
    busy = time.perf_counter() - watch.mark  # this thread's share: label warps, Dice, TRE, the QA's inputs
    files = writes.wait()  # metrics.json, last, says done: every other file is in place
    watch.lap("outputs")
    watch.add("outputs: evaluation", busy)
    for name, seconds in files.items():
        watch.add(f"outputs: {name}", seconds)
    metrics["timings"] = watch.result()
    writes.write("metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2, default=float)))
    return metrics
