"""Register one pair of files and write the contract outputs into a folder: the CLI's ``register``
and ``demo`` and every pair of ``batch`` go through :func:`register_to_folder`.

Into ``out``: ``warped.<ext of fixed>``, ``warped_labels.<ext>`` (with labels),
``displacement.nii.gz`` (ITK displacement field, mm, fixed grid), ``jacobian.nii.gz``,
``homography.txt`` (methods with a homography: moving_phys_from_fixed_phys, 3x3), ``qa.png``
and, last, ``metrics.json`` with ``"status": "done"``. Every file is written under a temporary
name and renamed, so a failed or cancelled run never leaves a half-written file under a real name,
and a folder whose ``metrics.json`` says done holds every output. Input files are never written.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

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

    def inputs(self) -> tuple[str, ...]:
        return tuple(str(Path(p).resolve()) for p in asdict(self).values() if p)


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


def _warp_identity(labels: Any, fixed: Any) -> Any:
    from .transforms import MatrixTransform, warp_image

    return warp_image(labels, MatrixTransform(np.eye(fixed.ndim + 1)), fixed.geometry, labels=True)


def register_to_folder(pair: PairFiles, out: Path, *, method: Any = "optimize", checkpoint: Optional[str] = None,
                       io_steps: Optional[int] = None, device: str = "auto", options: Optional[dict] = None,
                       progress: Optional[Callable[[Any], None]] = None) -> dict[str, Any]:
    """Register ``pair`` and write its outputs into ``out``; returns the metrics (also in
    ``metrics.json``). ``method``: a name, a method instance to reuse (a loaded network), or a
    function ``dim -> method instance`` (the images' dimensionality is known once they are read)."""
    from .api import register
    from .image import read_image, write_image
    from .points import read_points
    from .metrics import tre
    from .qa import qa_figure

    out = Path(out)
    inputs = pair.inputs()
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
    _prepare_folder(out)
    if callable(method):
        method = method(fixed.ndim)
    result = register(moving, fixed, method=method, checkpoint=checkpoint, io_steps=io_steps, device=device,
                      progress=progress, options=options)
    ext = out_ext(pair.fixed)
    written: list[str] = []

    def write(name: str, writer: Callable[[Path], Any]) -> None:
        try:
            with atomic_path(out / name) as tmp:
                writer(tmp)
        except OSError as e:  # full disk, permissions: say which file and what to do
            raise output_error(e, out / name) from None
        written.append(name)

    write(f"warped{ext}", lambda p: write_image(result.warped, p, protect=inputs))
    write("displacement.nii.gz", result.field.save)
    write("jacobian.nii.gz", lambda p: write_image(result.jacobian, p, protect=inputs))
    matrix = result.homography if result.homography is not None else result.transform
    if matrix.as_matrix() is not None:  # a homography (fitted, or the result itself), as 3x3 text
        from .transforms import MatrixTransform

        write("homography.txt", MatrixTransform(matrix.as_matrix()).save_txt)
    metrics: dict[str, Any] = {
        "method": result.method, "checkpoint": result.checkpoint, "io_steps": result.io_steps,
        "device": result.device, "seconds": round(result.seconds, 3), "fold_fraction": result.fold_fraction,
        "moving": str(pair.moving), "fixed": str(pair.fixed),
    }
    if result.notes:
        metrics["notes"] = list(result.notes)
    if mlab is not None:
        wl = result.warp_labels(mlab)
        write(f"warped_labels{ext if ext not in ('.jpg', '.jpeg') else '.png'}",
              lambda p: write_image(wl, p, protect=inputs))
        if flab is not None:
            per, before = _dice(wl, flab), _dice(_warp_identity(mlab, fixed), flab)
            metrics["dice"] = per
            metrics["dice_mean"] = float(np.nanmean(list(per.values()))) if per else float("nan")
            metrics["dice_before"] = before
            metrics["dice_mean_before"] = float(np.nanmean(list(before.values()))) if before else float("nan")
    if mp is not None and fp is not None:
        metrics["tre_before"] = tre(fp, mp)["mean"]
        after = tre(result.map_points(fp), mp)
        metrics["tre_after"], metrics["tre_after_max"] = after["mean"], after["max"]
    title = f"{result.method}: folds {100 * result.fold_fraction:.3f}%" + (
        f", Dice {metrics['dice_mean']:.3f}" if "dice_mean" in metrics else "")
    write("qa.png", lambda p: qa_figure(fixed.luminance(), result.warped.luminance(), result.field.disp_vox(),
                                        result.jacobian.array, p, title=title, spacing_xyz=fixed.geometry.spacing))
    metrics["outputs"] = written + ["metrics.json"]
    metrics["status"] = "done"
    write("metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2, default=float)))
    return metrics
