"""Benchmark tasks on the real data (``napari_register.data.data_root()``): cases, loaders, ground truth.

A :class:`Case` names files; :func:`load` turns it into a :class:`Pair` of SimpleITK images with
the quirks of each data set fixed (label geometry, channel-last masks, RGB photos). Every result is
judged by :func:`evaluate` in the *fixed* image's frame: moving labels warped onto the fixed grid
(nearest neighbour) against the fixed labels, and fixed landmarks mapped fixed -> moving against
the moving landmarks (ITK's direction), so TRE is in the moving image's physical units.

Tasks (``TASKS``):

* ``oasis``     - brain3d/oasis_pair, moving image_A -> fixed image_B, mean Dice of labels 1 and 2.
* ``prostate``  - 5 inter-subject MR pairs (unpaired_train): gland Dice, landmark-centroid TRE (mm),
  the Dice of the two small landmark regions (``dice_small``).
* ``prostate_val`` - 4 pairs of the other unpaired cases (training images): for choosing settings.
* ``mr_us``     - paired_mr_us_train cases 0-4, moving MR -> fixed ultrasound (different grids).
* ``histology`` - CIMA lesion 1, moving = each non-HE stain -> fixed HE, 78 landmarks. The photos
  are block-averaged by ``shrink`` (4) and, like every photo in the project, get spacing 1 and
  origin 0, so physical units are *downsampled* pixels; TRE is scaled back to original pixels.
  (Spacing = ``shrink`` would keep original-pixel units, but then elastix's default B-spline
  grid of 10 physical units is 2.5 voxels and folds 15-20% of the image.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from napari_register import metrics
# The data root and the cases held out of training exist once, in the product's data package.
from napari_register.data import HISTOLOGY_LESIONS, MR_US_CASES, PROSTATE_PAIRS, data_root


@dataclass(frozen=True)
class Case:
    """One registration problem: files and how to score it.

    ``dice_labels``: (label channel, label value) pairs whose Dice is averaged into ``dice``.
    ``landmark_channels``: label channels whose centroids are the landmarks (prostate); histology
    reads landmark CSVs instead. ``shrink``: 2D photos are block-averaged by this factor, and TRE
    is multiplied by it to report original pixels.
    """

    task: str
    name: str
    dim: int
    multimodal: bool
    moving: Path
    fixed: Path
    moving_labels: Optional[Path] = None
    fixed_labels: Optional[Path] = None
    moving_points: Optional[Path] = None
    fixed_points: Optional[Path] = None
    dice_labels: tuple[tuple[int, int], ...] = ()
    landmark_channels: tuple[int, ...] = ()
    # small structures scored on their own (``dice_small``): (channel, value) pairs, empty ones skipped
    small_labels: tuple[tuple[int, int], ...] = ()
    shrink: int = 1
    tre_unit: str = "mm"


@dataclass
class Pair:
    """A loaded case. Images are float32; label maps (one per channel) are uint8/int16 on their
    image's grid; points are ``(N, d)`` physical (x, y[, z]) with matching rows."""

    case: Case
    moving: sitk.Image
    fixed: sitk.Image
    moving_labels: list[sitk.Image] = field(default_factory=list)
    fixed_labels: list[sitk.Image] = field(default_factory=list)
    moving_points: Optional[np.ndarray] = None
    fixed_points: Optional[np.ndarray] = None


# ---------------------------------------------------------------------------------------- cases

def oasis_cases() -> list[Case]:
    d = data_root() / "brain3d" / "oasis_pair"
    return [Case("oasis", "oasis_A_to_B", 3, False,
                 moving=d / "image_A_160x192x144.nii.gz", fixed=d / "image_B_160x192x144.nii.gz",
                 moving_labels=d / "image_A_160x192x144_seg.nii.gz",
                 fixed_labels=d / "image_B_160x192x144_seg.nii.gz",
                 dice_labels=((0, 1), (0, 2)))]


# Settings are chosen on these: inter-subject pairs of the prostate cases the training may see,
# never on the benchmark's PROSTATE_PAIRS.
PROSTATE_VALIDATION_PAIRS = ((19, 22), (22, 23), (23, 24), (24, 19))


def prostate_cases(pairs: tuple[tuple[int, int], ...] = PROSTATE_PAIRS, task: str = "prostate") -> list[Case]:
    d = data_root() / "prostate3d" / "unpaired_train"
    out = []
    for m, f in pairs:
        out.append(Case(task, f"{task}_{m:02d}_to_{f:02d}", 3, False,
                        moving=d / "images" / f"case{m:06d}.nii.gz", fixed=d / "images" / f"case{f:06d}.nii.gz",
                        moving_labels=d / "labels" / f"case{m:06d}.nii.gz",
                        fixed_labels=d / "labels" / f"case{f:06d}.nii.gz",
                        dice_labels=((0, 1),), landmark_channels=(1, 2), small_labels=((1, 1), (2, 1))))
    return out


def mr_us_cases(numbers: tuple[int, ...] = MR_US_CASES) -> list[Case]:
    d = data_root() / "prostate3d" / "paired_mr_us_train"
    return [Case("mr_us", f"mr_us_{c:02d}", 3, True,
                 moving=d / "moving_images" / f"case{c:06d}.nii.gz", fixed=d / "fixed_images" / f"case{c:06d}.nii.gz",
                 moving_labels=d / "moving_labels" / f"case{c:06d}.nii.gz",
                 fixed_labels=d / "fixed_labels" / f"case{c:06d}.nii.gz",
                 dice_labels=((0, 1),), landmark_channels=(1, 2))
            for c in numbers]


HISTOLOGY_STAINS = ("CD31-3", "Cc10-5", "Ki67-7", "proSPC-4")


def histology_cases(shrink: int = 4) -> list[Case]:
    d = data_root() / "histology2d"
    out = []
    for les in HISTOLOGY_LESIONS:
        stem = "29-041-Izd2-w35-{}-" + les
        fixed = stem.format("He")
        suffix = f"_{les}" if len(HISTOLOGY_LESIONS) > 1 else ""
        out += [Case("histology", f"histology_{s.split('-')[0]}_to_HE{suffix}", 2, True,
                     moving=d / f"{stem.format(s)}.jpg", fixed=d / f"{fixed}.jpg",
                     moving_points=d / f"{stem.format(s)}.csv", fixed_points=d / f"{fixed}.csv",
                     shrink=shrink, tre_unit="px")
                for s in HISTOLOGY_STAINS]
    return out


TASKS: dict[str, Callable[[], list[Case]]] = {
    "oasis": oasis_cases, "prostate": prostate_cases, "mr_us": mr_us_cases, "histology": histology_cases,
    "prostate_val": lambda: prostate_cases(PROSTATE_VALIDATION_PAIRS, "prostate_val"),
}


def cases(task: str) -> list[Case]:
    try:
        return TASKS[task]()
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


# -------------------------------------------------------------------------------------- loading

def read_photo(path: Path, shrink: int = 1) -> sitk.Image:
    """RGB photo -> luminance float32 image, block-averaged by ``shrink``; spacing 1, origin 0.

    Physical (x, y) = (column, row) of the downsampled image; :func:`photo_points` converts."""
    from PIL import Image as PILImage  # only the 2D task needs it

    lum = np.asarray(PILImage.open(path).convert("L"), dtype=np.float32)  # ITU-R 601 luminance
    if shrink > 1:
        h, w = (s // shrink * shrink for s in lum.shape)
        lum = lum[:h, :w].reshape(h // shrink, shrink, w // shrink, shrink).mean((1, 3))
    return sitk.GetImageFromArray(lum)


def _read_label_channels(path: Path, image: sitk.Image) -> list[sitk.Image]:
    """Label file -> one label map per channel, on ``image``'s grid.

    The headers are not trusted: the OASIS segmentations carry a wrong spacing/origin and the
    prostate masks are 4D channel-last (SimpleITK puts the channel first in the array)."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    channels = [arr] if arr.ndim == image.GetDimension() else list(arr)
    out = []
    for ch in channels:
        if ch.shape != sitk.GetArrayViewFromImage(image).shape:
            raise ValueError(f"{path}: label grid {ch.shape} does not match its image grid "
                             f"{sitk.GetArrayViewFromImage(image).shape}")
        lab = np.rint(ch).astype(np.int16 if ch.max() > 255 else np.uint8)
        img = sitk.GetImageFromArray(lab)
        img.CopyInformation(image)
        out.append(img)
    return out


def _centroid_phys(label: sitk.Image) -> np.ndarray:
    """Physical centroid (x, y[, z]) of a binary label map; NaN when empty."""
    c = metrics.centroid_vox(sitk.GetArrayViewFromImage(label) > 0)
    if np.isnan(c).any():
        return np.full(label.GetDimension(), np.nan)
    return np.array(label.TransformContinuousIndexToPhysicalPoint([float(v) for v in c[::-1]]))


def _landmark_centroids(moving: list[sitk.Image], fixed: list[sitk.Image],
                        channels: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of the landmark channels present (non-empty) in both label sets."""
    pm, pf = [], []
    for ch in channels:
        if ch < len(moving) and ch < len(fixed):
            m, f = _centroid_phys(moving[ch]), _centroid_phys(fixed[ch])
            if not (np.isnan(m).any() or np.isnan(f).any()):
                pm.append(m)
                pf.append(f)
    d = fixed[0].GetDimension()
    return np.reshape(pm, (-1, d)), np.reshape(pf, (-1, d))


def photo_points(path: Path, shrink: int = 1) -> np.ndarray:
    """Landmark CSV (unnamed index column, X = column, Y = row, original pixels) -> ``(N, 2)``
    (x, y) in the pixels of :func:`read_photo` (block ``i`` covers original pixels
    ``shrink*i .. shrink*i + shrink-1``, its centre is ``shrink*i + (shrink-1)/2``)."""
    xy = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)[:, 1:3]
    return (xy - (shrink - 1) / 2) / shrink


def load(case: Case) -> Pair:
    """Read a case into images, label maps and landmarks (see :class:`Pair`)."""
    if case.dim == 2:
        moving, fixed = read_photo(case.moving, case.shrink), read_photo(case.fixed, case.shrink)
    else:
        moving = sitk.ReadImage(str(case.moving), sitk.sitkFloat32)
        fixed = sitk.ReadImage(str(case.fixed), sitk.sitkFloat32)
    pair = Pair(case, moving, fixed)
    if case.moving_labels is not None:
        pair.moving_labels = _read_label_channels(case.moving_labels, moving)
        pair.fixed_labels = _read_label_channels(case.fixed_labels, fixed)
    if case.moving_points is not None:
        pair.moving_points = photo_points(case.moving_points, case.shrink)
        pair.fixed_points = photo_points(case.fixed_points, case.shrink)
    elif case.landmark_channels:
        pair.moving_points, pair.fixed_points = _landmark_centroids(
            pair.moving_labels, pair.fixed_labels, case.landmark_channels)
    return pair


# ----------------------------------------------------------------------------------- evaluation

def evaluate(pair: Pair, warped_labels: Optional[list[np.ndarray]] = None,
             mapped_points: Optional[np.ndarray] = None) -> dict[str, float]:
    """Score a result against the case's ground truth.

    ``warped_labels``: moving label maps resampled onto the fixed grid (arrays, array order), one
    per label channel. ``mapped_points``: the fixed landmarks mapped fixed -> moving, ``(N, d)``
    physical. Returns ``dice`` (mean over ``case.dice_labels``), ``dice_<ch>_<value>``, ``tre``
    (mean, in ``case.tre_unit``), ``n_points`` and ``dice_small`` (mean Dice of the
    ``case.small_labels`` present in both images); a missing quantity is absent.
    """
    out: dict[str, float] = {}
    if warped_labels is not None and pair.case.dice_labels:
        vals = []
        for ch, value in pair.case.dice_labels:
            fixed = sitk.GetArrayViewFromImage(pair.fixed_labels[ch])
            d = metrics.dice(warped_labels[ch], fixed, labels=[value])[value]
            out[f"dice_{ch}_{value}"] = d
            vals.append(d)
        out["dice"] = float(np.nanmean(vals))
    small = []
    for ch, value in pair.case.small_labels if warped_labels is not None else ():
        if ch < len(pair.fixed_labels) and ch < len(pair.moving_labels):
            fixed = sitk.GetArrayViewFromImage(pair.fixed_labels[ch]) == value
            moving = sitk.GetArrayViewFromImage(pair.moving_labels[ch]) == value
            if fixed.any() and moving.any():  # some cases lack a landmark region
                small.append(metrics.dice(warped_labels[ch], fixed.astype(np.uint8), labels=[1])[1])
    if small:
        out["dice_small"] = float(np.mean(small))
    if mapped_points is not None and pair.moving_points is not None and len(pair.moving_points):
        scale = [float(pair.case.shrink)] * pair.moving_points.shape[1]  # back to original pixels
        out["tre"] = metrics.tre(np.asarray(mapped_points), pair.moving_points, scale)["mean"]
        out["n_points"] = len(pair.moving_points)
    return out
