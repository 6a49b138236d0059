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

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from napari_register import metrics
# The data root and the cases held out of training exist once, in the product's data package.
from napari_register.data import HISTOLOGY_LESIONS, MR_US_CASES, PROSTATE_PAIRS, data_root, splits


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
    # how the label files become tissue labels (brains: "oasis", "aseg", "mni"; "" reads them as they are)
    tissue: tuple[str, str] = ("", "")
    split: str = ""  # "dev" or "test" for the broad benchmark's cases (napari_register.data.splits)


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


# ------------------------------------------------------------------ the broad benchmark (dev / test)

def prostate_split_cases(split: str) -> list[Case]:
    """Every ordered inter-subject pair among the split's prostate MR cases."""
    out = prostate_cases(splits.prostate_pairs(split), "prostate_pairs")
    return [replace(c, split=split) for c in out]


def mr_us_split_cases(split: str) -> list[Case]:
    return [replace(c, task="mr_us_all", split=split) for c in mr_us_cases(splits.mr_us_cases(split))]


def brain_files(name: str) -> tuple[Path, Path]:
    """(image, labels source) of a brain of :data:`splits.BRAINS`."""
    root = data_root()
    return {
        "oasis_A": (root / "brain3d/oasis_pair/image_A_160x192x144.nii.gz",
                    root / "brain3d/oasis_pair/image_A_160x192x144_seg.nii.gz"),
        "oasis_B": (root / "brain3d/oasis_pair/image_B_160x192x144.nii.gz",
                    root / "brain3d/oasis_pair/image_B_160x192x144_seg.nii.gz"),
        "aseg": (root / "brain3d/aseg_subject/test_vol.nii.gz", root / "brain3d/aseg_subject/test_scan.npz"),
        "mni": (root / "mni/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                root / "mni/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
    }[name]


def brain_split_cases(split: str) -> list[Case]:
    """Every ordered pair of the split's brains, scored on GM (1) and WM (2) Dice."""
    out = []
    for m, f in splits.brain_pairs(split):
        (mi, ml), (fi, fl) = brain_files(m), brain_files(f)
        out.append(Case("brains", f"brains_{m}_to_{f}", 3, False, moving=mi, fixed=fi, moving_labels=ml,
                        fixed_labels=fl, dice_labels=((0, 1), (0, 2)), tissue=(m, f), split=split))
    return out


def histology_split_cases(split: str, shrink: int = 4) -> list[Case]:
    """Every ordered stain pair of CIMA lesion 1 whose fixed stain is in the split."""
    d = data_root() / "histology2d"
    stem = "29-041-Izd2-w35-{}-les1"
    return [Case("histology_pairs", f"histology_{m.split('-')[0]}_to_{f.split('-')[0]}", 2, True,
                 moving=d / f"{stem.format(m)}.jpg", fixed=d / f"{stem.format(f)}.jpg",
                 moving_points=d / f"{stem.format(m)}.csv", fixed_points=d / f"{stem.format(f)}.csv",
                 shrink=shrink, tre_unit="px", split=split)
            for m, f in splits.histology_pairs(split)]


BROAD: dict[str, Callable[[str], list[Case]]] = {
    "prostate_pairs": prostate_split_cases, "mr_us_all": mr_us_split_cases, "brains": brain_split_cases,
    "histology_pairs": histology_split_cases,
}

# aseg structures -> tissue: cerebral and cerebellar cortex and the deep grey nuclei are GM (1);
# cerebral and cerebellar white matter and the corpus callosum are WM (2); the rest is background.
ASEG_GM = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58)
ASEG_WM = (2, 41, 7, 46, 251, 252, 253, 254, 255)


def brain_tissue(kind: str, path: Path, image: sitk.Image) -> sitk.Image:
    """GM = 1 / WM = 2 label map on ``image``'s grid from a brain's own segmentation: the OASIS
    tissue map as it is; FreeSurfer's aseg by :data:`ASEG_GM` / :data:`ASEG_WM`; the MNI template's
    GM and WM probability maps by the larger of the two where it is at least 0.5."""
    if kind == "oasis":
        return _read_label_channels(path, image)[0]
    if kind == "aseg":  # the npz holds the segmentation in the NIfTI's array order (x, y, z)
        seg = np.load(path)["seg"].transpose(2, 1, 0)
        lab = np.where(np.isin(seg, ASEG_GM), 1, np.where(np.isin(seg, ASEG_WM), 2, 0)).astype(np.uint8)
    elif kind == "mni":
        gm = sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32)) / 255.0
        wm = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace("_gm_", "_wm_"), sitk.sitkFloat32)) / 255.0
        lab = np.where((gm >= 0.5) & (gm >= wm), 1, np.where((wm >= 0.5) & (wm > gm), 2, 0)).astype(np.uint8)
    else:
        raise ValueError(f"unknown tissue mapping {kind!r}")
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(image)
    return out


def _brain_image(kind: str, path: Path) -> sitk.Image:
    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if kind == "mni":  # the template has a skull; the other brains are skull-stripped
        from napari_register.data.volumes import mni_brain_mask

        arr = sitk.GetArrayFromImage(img) * mni_brain_mask(path)
        out = sitk.GetImageFromArray(arr.astype(np.float32))
        out.CopyInformation(img)
        return out
    return img


TASKS: dict[str, Callable[[], list[Case]]] = {
    "oasis": oasis_cases, "prostate": prostate_cases, "mr_us": mr_us_cases, "histology": histology_cases,
    "prostate_val": lambda: prostate_cases(PROSTATE_VALIDATION_PAIRS, "prostate_val"),
}


def cases(task: str, split: str = "") -> list[Case]:
    """The cases of a task; the broad tasks (:data:`BROAD`) need a ``split`` (dev or test)."""
    if task in BROAD:
        return BROAD[task](split or "dev")
    try:
        return TASKS[task]()
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join([*TASKS, *BROAD])}") from None


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
    elif case.tissue[0]:
        moving, fixed = _brain_image(case.tissue[0], case.moving), _brain_image(case.tissue[1], case.fixed)
    else:
        moving = sitk.ReadImage(str(case.moving), sitk.sitkFloat32)
        fixed = sitk.ReadImage(str(case.fixed), sitk.sitkFloat32)
    pair = Pair(case, moving, fixed)
    if case.tissue[0]:
        kinds = ["oasis" if k.startswith("oasis") else k for k in case.tissue]
        pair.moving_labels = [brain_tissue(kinds[0], case.moving_labels, moving)]
        pair.fixed_labels = [brain_tissue(kinds[1], case.fixed_labels, fixed)]
    elif case.moving_labels is not None:
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
