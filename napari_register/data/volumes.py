"""Real training volumes from the data root: brains (reoriented alike, resampled at 2 mm) and
prostate MR, every benchmark case dropped (:data:`napari_register.data.HOLDOUT`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import coords
from ..intensity import normalise
from . import HOLDOUT, data_root
from .synthmorph import random_map

BRAINS = ["brain3d/oasis_256/image_A.nii.gz", "brain3d/oasis_256/image_B.nii.gz",
          "brain3d/aseg_subject/test_vol.nii.gz", "mni/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"]
PROSTATE_MR = "prostate3d/paired_mr_us_train/moving_images"
BRAIN_MM = 2.0  # brains train at 2 mm, the scale CARL's working grid gives the OASIS pair


def reorient(array: np.ndarray, direction: np.ndarray, spacing_xyz: tuple[float, ...],
             signs: tuple[int, ...] = (-1, -1, 1)) -> tuple[np.ndarray, tuple[float, ...]]:
    """Permute/flip a (z, y, x) volume so its index axes run along physical x, y, z with ``signs``
    (the OASIS evaluation pair's orientation), so every training brain faces the same way."""
    xyz = array.transpose(2, 1, 0)
    direction = np.asarray(direction)
    perm = [int(np.argmax(np.abs(direction[p]))) for p in range(3)]  # index axis along physical p
    xyz = xyz.transpose(perm)
    for p in range(3):
        if np.sign(direction[p, perm[p]]) != signs[p]:
            xyz = np.flip(xyz, p)
    return np.ascontiguousarray(xyz.transpose(2, 1, 0)), tuple(float(spacing_xyz[a]) for a in perm)


def mni_brain_mask(t1: Path) -> np.ndarray:
    """The ICBM152 template has a skull: its brain is GM + WM (the tissue maps beside ``t1``),
    dilated by 3 voxels (array order, bool)."""
    from scipy import ndimage

    from ..image import read_image

    tissue = sum(read_image(Path(str(t1).replace("_t1_", f"_{t}_"))).array for t in ("gm", "wm"))
    return ndimage.binary_dilation(tissue > 0.3 * tissue.max(), iterations=3)


class RealVolumes:
    """Training volumes (array order, [0, 1]) and their spacing, grouped so pairs are like-for-like."""

    def __init__(self, root: Optional[Path] = None) -> None:
        from ..image import read_image

        root = data_root() if root is None else Path(root)

        self.groups: dict[str, list[tuple[torch.Tensor, np.ndarray]]] = {"brain": [], "prostate": []}
        self.names: list[str] = []  # files used, for the card and the leakage test
        if not root.exists():
            return
        for rel in BRAINS:
            p = root / rel
            if p.exists() and not HOLDOUT.excludes(rel):
                img = read_image(p)
                array = img.array.astype(np.float32)
                if rel.startswith("mni/"):
                    array = array * mni_brain_mask(root / rel)
                array, spacing = reorient(array, img.geometry.direction, img.geometry.spacing)
                self.groups["brain"].append(self._tensor(array, spacing))
                self.names.append(rel)
        for p in sorted((root / PROSTATE_MR).glob("case*.nii.gz")):
            rel = f"{PROSTATE_MR}/{p.name}"
            if not HOLDOUT.excludes(rel):
                img = read_image(p)
                self.groups["prostate"].append(self._tensor(img.array, img.geometry.spacing))
                self.names.append(rel)
        self.groups = {k: v for k, v in self.groups.items() if v}

    @staticmethod
    def _tensor(array: np.ndarray, spacing_xyz: tuple[float, ...]) -> tuple[torch.Tensor, np.ndarray]:
        t = torch.from_numpy(normalise(np.asarray(array, np.float32)))[None, None]
        return t, np.asarray(spacing_xyz[::-1], np.float64)

    def __len__(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def sample(self, vol: torch.Tensor, spacing: np.ndarray, group: str, shape: tuple[int, ...],
               gen: torch.Generator, slice_axis: int | None, max_shift: float = 0.15) -> torch.Tensor:
        """Resample ``vol`` onto the training grid (2D: an axial/coronal/sagittal slice), through a
        random translation of up to ``max_shift`` (norm units), a scale jitter and a smooth warp."""
        if slice_axis is not None:  # 2D: pick a slice near the middle, keep the other two axes
            n = vol.shape[2 + slice_axis]
            idx = int(n // 2 + (torch.rand(1, generator=gen) * 2 - 1) * n * 0.15)
            vol = vol.select(2 + slice_axis, idx)
            spacing = np.delete(spacing, slice_axis)
        extent = (np.asarray(vol.shape[2:]) - 1) * spacing
        # 3D: brains at 2 mm, prostate at its native spacing (as the inference working grid keeps
        # them); 2D: the slice fills the grid, as a photo fills its working grid.
        if slice_axis is not None:
            step = extent.max() / (max(shape) - 1)
        else:
            step = BRAIN_MM if group == "brain" else spacing.min()
        out_extent = (np.asarray(shape) - 1) * step
        scale = torch.tensor(out_extent / extent, dtype=torch.float32)
        scale = scale * float(torch.exp(0.1 * torch.randn(1, generator=gen)))
        phi = random_map(shape, gen, max_disp=0.04, max_shift=max_shift, scale=scale)
        return coords.sample(vol, phi, padding_mode="zeros")
