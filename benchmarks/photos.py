"""Task 5: photos with random homographies (the DeepHomography / AltO / ART protocol), MACE in px.

Each case comes from :func:`napari_register.data.photos.make_pair` on a benchmark photo bundled with
scikit-image (no download; the hold-out list keeps them out of training): a 192 px fixed crop, a
random homography that moves the four corners of its central 128 x 128 patch by up to 32 px, and the
moving image drawn through it from the whole photo. Variants: ``clean``; ``degraded`` (0.85x scale
folded into the homography, a small elastic warp of ~1 px, blur, gamma and noise; ``truth`` is the
homography part and MACE is measured against it); ``modality`` (the moving photo's intensities
remapped by ``0.5 + 0.5 sin(k pi x)``, a different "sensor"). The three variants of a photo share its
crop and corner offsets. Case ``i`` draws from ``torch.Generator().manual_seed(BENCHMARK_SEED +
1000 * seed + i)``: a namespace far from the small seeds training uses. MACE = mean distance between
the patch corners mapped by the estimate and by the truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from napari_register.coords import apply_h
from napari_register.data import BENCHMARK_PHOTOS
from napari_register.data.photos import make_pair, patch_corners
from napari_register.metrics import mace as corner_error

PHOTOS = BENCHMARK_PHOTOS
SIZE, PATCH, RHO = 192, 128, 32
BENCHMARK_SEED = 1_000_000_000
VARIANTS = {"clean": {}, "degraded": {"scale": (0.85, 0.85), "elastic": 1.0, "photometric": 1.0},
            "modality": {"modality": 1.0, "modes": ("sine",)},
            "multimodal": {"modality": 1.0}}  # each pair one of the four changes (sine, inversion, channel mix, edges)


@dataclass
class PhotoCase:
    task: str
    name: str
    dim: int
    multimodal: bool
    fixed: np.ndarray
    moving: np.ndarray
    truth: np.ndarray  # 3x3 moving_from_fixed in pixel (x, y) coordinates


VALIDATION_SEED = 2_000_000_000  # validation cases: training photos, seeds training never draws


def cases(variant: str = "clean", n: int | None = None, seed: int = 0, validation: bool = False) -> list[PhotoCase]:
    """The benchmark's cases; ``validation``: the same protocol on the *training* photos (scikit-image
    ones only), other seeds: for choosing settings and checkpoints without a benchmark photo."""
    if variant not in VARIANTS:
        raise ValueError(f"photo variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    from napari_register.data.photos import photo_names

    names = [p for p in photo_names("train") if "/" not in p] if validation else PHOTOS
    base = VALIDATION_SEED if validation else BENCHMARK_SEED
    out = []
    for i, name in enumerate(names[:n]):
        gen = torch.Generator().manual_seed(base + 1000 * seed + i)
        p = make_pair(name, gen, size=PATCH, rho=RHO, view=SIZE, **VARIANTS[variant])
        out.append(PhotoCase(f"photos_{variant}", f"{name}_{variant}", 2, "modality" in VARIANTS[variant],
                             p.fixed[0, 0].numpy(), p.moving[0, 0].numpy(), p.truth_matrix.numpy()))
    return out


def corners() -> np.ndarray:
    """The four corners (x, y) of the central patch whose perturbation defines the homography."""
    return patch_corners(PATCH, SIZE).numpy()


def mace(estimate: Callable[[np.ndarray], np.ndarray], truth: np.ndarray) -> float:
    """Mean corner error between ``estimate`` (fixed px -> moving px) and the true homography."""
    c = corners()
    return corner_error(estimate(c), apply_h(truth, c))


def to_sitk(a: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(a.astype(np.float32))


def score(errors: list[float], accept: tuple[float, ...] = (3.0, 5.0, 10.0),
          auc_at: tuple[float, ...] = (10.0,)) -> dict[str, float]:
    """MACE statistics of one method on one variant; a failed pair is ``inf`` (counted, never
    averaged in ``mace_mean``; the worst value in the median and the rates). ``acc<t``: share of
    pairs under ``t`` px; ``auc@t``: area under the share-below curve on [0, t], divided by t."""
    e = np.asarray(errors, dtype=np.float64)
    ok = e[np.isfinite(e)]
    out = {"n": int(e.size), "failed": int(e.size - ok.size),
           "mace_mean": float(ok.mean()) if ok.size else float("nan"),
           "mace_median": float(np.median(e)) if e.size else float("nan"),
           "mace_max": float(e.max()) if e.size else float("nan")}
    for t in accept:
        out[f"acc<{t:g}"] = float((e < t).mean()) if e.size else float("nan")
    for t in auc_at:
        ts = np.linspace(0, t, 1001)
        frac = np.searchsorted(np.sort(e), ts, side="right") / max(e.size, 1)
        out[f"auc@{t:g}"] = float(np.trapezoid(frac, ts) / t)
    return out

