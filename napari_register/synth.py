"""Training pairs: SynthMorph-style synthetic images mixed with real volumes from ``../shared/data``.

Synthetic: a random label map (argmax of smooth noise) rendered with random per-label intensities,
then two independently deformed (smooth random field + random translation, zeros outside) and
independently corrupted (noise, bias, gamma) copies. Real: two volumes of one group (brains or
prostate MR; evaluation cases excluded), each resampled onto the training grid through its own
random deformation and translation. Every pair is ``(moving, fixed)``, ``(B, 1, *shape)`` in [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import coords

DATA_ROOT = Path(os.environ.get("NAPARI_REGISTER_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# Held out for evaluation; never trained on (the benchmark's prostate pairs and the OASIS pair).
PROSTATE_EVAL = {"000000", "000001", "000003", "000008", "000009", "000011", "000012", "000014", "000017", "000018"}
BRAINS = ["brain3d/oasis_256/image_A.nii.gz", "brain3d/oasis_256/image_B.nii.gz",
          "brain3d/aseg_subject/test_vol.nii.gz", "mni/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"]
BRAIN_MM = 2.0  # brains train at 2 mm, the scale CARL's working grid gives the OASIS pair


def smooth_noise(shape: tuple[int, ...], channels: int, coarse: int, gen: torch.Generator) -> torch.Tensor:
    """``(1, channels, *shape)`` smooth noise: Gaussian noise on a ``coarse``^d grid, upsampled."""
    d = len(shape)
    small = torch.randn(1, channels, *([coarse] * d), generator=gen)
    return F.interpolate(small, size=shape, mode="bilinear" if d == 2 else "trilinear", align_corners=True)


def random_map(shape: tuple[int, ...], gen: torch.Generator, max_disp: float, max_shift: float,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """Map ``(1, d, *shape)`` from the output grid into a source image's norm frame: a smooth random
    displacement (up to ~``max_disp``, norm units), a translation up to ``max_shift`` and an optional
    per-axis ``scale`` about the centre (output extent / source extent)."""
    d = len(shape)
    ident = coords.identity_map(shape)
    scale = torch.ones(d) if scale is None else scale
    shift = (torch.rand(d, generator=gen) * 2 - 1) * max_shift
    centred = (ident - 0.5) * scale.view(1, d, *[1] * d) + 0.5 + shift.view(1, d, *[1] * d)
    coarse = int(torch.randint(3, 7, (1,), generator=gen))
    amp = max_disp * float(torch.rand(1, generator=gen))
    return centred + amp * smooth_noise(shape, d, coarse, gen) / 2


def synthetic_image(shape: tuple[int, ...], gen: torch.Generator, n_labels: int = 12) -> torch.Tensor:
    """``(1, 1, *shape)`` label-map image; background (zero) outside a random blob with p = 0.7."""
    d = len(shape)
    labels = smooth_noise(shape, n_labels, int(torch.randint(4, 10, (1,), generator=gen)), gen).argmax(1)
    intensity = torch.rand(n_labels, generator=gen)
    img = intensity[labels][:, None]
    # Shared fine texture (both images of a pair see it): flat label regions give LNCC no signal.
    texture = smooth_noise(shape, 1, max(shape) // 3, gen)
    img = (img + 0.15 * float(torch.rand(1, generator=gen)) * texture).clamp(0, 1)
    if float(torch.rand(1, generator=gen)) < 0.7:
        ident = coords.identity_map(shape)
        radius = 0.3 + 0.15 * torch.rand(d, generator=gen)
        r2 = (((ident - 0.5) / radius.view(1, d, *[1] * d)) ** 2).sum(1, keepdim=True)
        blob = r2 + 0.3 * smooth_noise(shape, 1, 4, gen)
        img = img * (blob < 1).float()
    return img


def corrupt(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Independent per-image appearance: bias field, gamma, noise; renormalised to [0, 1]."""
    shape = tuple(img.shape[2:])
    bias = torch.exp(0.2 * smooth_noise(shape, 1, 3, gen))
    gamma = float(torch.exp(0.25 * torch.randn(1, generator=gen)))
    out = (img * bias).clamp(min=0) ** gamma
    out = out + 0.02 * torch.rand(1, generator=gen) * torch.randn(out.shape, generator=gen) * (img > 0)
    return out.clamp(min=0) / out.amax().clamp(min=1e-6)


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


def _normalise(a: np.ndarray) -> np.ndarray:
    from .api import normalise  # same robust percentile normalisation as inference

    return normalise(a)


class RealVolumes:
    """Training volumes (array order, [0, 1]) and their spacing, grouped so pairs are like-for-like."""

    def __init__(self, root: Path = DATA_ROOT) -> None:
        from .image import read_image

        self.groups: dict[str, list[tuple[torch.Tensor, np.ndarray]]] = {"brain": [], "prostate": []}
        self.names: list[str] = []  # files used, for the card and the leakage test
        if not root.exists():
            return
        for rel in BRAINS:
            p = root / rel
            if p.exists():
                img = read_image(p)
                array = img.array.astype(np.float32)
                if rel.startswith("mni/"):  # the template has a skull; keep the brain (GM + WM, dilated)
                    from scipy import ndimage

                    tissue = sum(read_image(root / rel.replace("_t1_", f"_{t}_")).array for t in ("gm", "wm"))
                    array = array * ndimage.binary_dilation(tissue > 0.3 * tissue.max(), iterations=3)
                array, spacing = reorient(array, img.geometry.direction, img.geometry.spacing)
                self.groups["brain"].append(self._tensor(array, spacing))
                self.names.append(rel)
        for p in sorted((root / "prostate3d/paired_mr_us_train/moving_images").glob("case*.nii.gz")):
            if p.name[4:10] not in PROSTATE_EVAL:
                img = read_image(p)
                self.groups["prostate"].append(self._tensor(img.array, img.geometry.spacing))
                self.names.append(f"prostate3d/paired_mr_us_train/moving_images/{p.name}")
        self.groups = {k: v for k, v in self.groups.items() if v}

    @staticmethod
    def _tensor(array: np.ndarray, spacing_xyz: tuple[float, ...]) -> tuple[torch.Tensor, np.ndarray]:
        t = torch.from_numpy(_normalise(np.asarray(array, np.float32)))[None, None]
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


class PairSource:
    """Endless iterator of ``(moving, fixed)`` batches ``(batch, 1, *shape)``."""

    def __init__(self, dim: int, shape: tuple[int, ...], batch: int = 1, real_fraction: float = 0.5,
                 seed: int = 0, root: Path = DATA_ROOT, real_shift: float = 0.15) -> None:
        if len(shape) != dim:
            raise ValueError(f"training shape {shape} is not {dim}D")
        self.dim, self.shape, self.batch = dim, tuple(shape), batch
        self.real_shift = float(real_shift)  # per-image translation of real volumes (norm units)
        self.gen = torch.Generator().manual_seed(seed)
        self.real = RealVolumes(root) if real_fraction > 0 else None
        self.real_fraction = real_fraction if self.real is not None and len(self.real) else 0.0

    def describe(self) -> dict:
        groups = {} if self.real is None else {k: len(v) for k, v in self.real.groups.items()}
        return {"synthetic": "SynthMorph-style label maps", "real_fraction": self.real_fraction,
                "real_volumes": groups, "real_files": [] if self.real is None else self.real.names, "shape": list(self.shape),
                "real_shift": self.real_shift,
                "excluded": {"prostate": sorted(PROSTATE_EVAL), "brain": "oasis_pair (evaluation)"}}

    def one(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gen
        if float(torch.rand(1, generator=g)) < self.real_fraction:
            group = list(self.real.groups)[int(torch.randint(len(self.real.groups), (1,), generator=g))]
            vols = self.real.groups[group]
            i, j = torch.randint(len(vols), (2,), generator=g).tolist()
            axis = None if self.dim == 3 else int(torch.randint(3, (1,), generator=g))
            a = self.real.sample(*vols[i], group, self.shape, g, axis, self.real_shift)
            b = self.real.sample(*vols[j], group, self.shape, g, axis, self.real_shift)
        else:
            base = synthetic_image(self.shape, g)
            a = coords.sample(base, random_map(self.shape, g, 0.08, 0.1), padding_mode="zeros")
            b = coords.sample(base, random_map(self.shape, g, 0.08, 0.1), padding_mode="zeros")
        return corrupt(a, g), corrupt(b, g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            pairs = [self.one() for _ in range(self.batch)]
            yield torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
