"""Photo pairs with a known homography (the DeepHomography / AltO protocol), for ART and AltO.

A pair: a ``view`` x ``view`` crop of a photo is the *fixed* image; the four corners of its central
``size`` x ``size`` patch are moved by up to ``rho`` px each (after an optional global scale), which
defines the homography ``H`` = moving_px_from_fixed_px; the *moving* image is the photo drawn
through ``H^-1`` from the *whole* photo (content outside the crop, reflected at the photo's edge).
An optional smooth elastic part ``E`` (fixed px -> fixed px) warps the fixed image instead, so the
truth stays exact without inverting a field: ``moving(H(E(x))) = fixed(x)``. Photometric changes
(blur, gamma, noise) and modality changes (a non-monotonic ``0.5 + 0.5 sin(k pi x)``, inversion,
random RGB channel mixing, gradient magnitude) touch the moving image only.

Frames of the outputs (``V = view``, default ``size``):

* ``fixed``, ``moving``: ``(1, 1, V, V)`` float32 in [0, 1].
* ``truth_matrix``: ``(3, 3)`` ``H``, moving px from fixed px, acting on ``(x, y, 1)`` with x =
  column, y = row (OpenCV's order); the homography part only when there is an elastic part.
* ``truth_map``: ``(1, 2, V, V)`` the exact dense moving_norm_from_fixed_norm map ``H o E`` in
  :mod:`napari_register.coords`' convention (channel 0 = row, ``norm = px / (V - 1)``), so
  ``coords.sample(moving, truth_map)`` is the fixed image.
* ``corners``: ``(4, 2)`` the patch corners in fixed px (x, y), the points of MACE.

Photos: scikit-image's bundled images (only the files in its wheel, never a download) and the data
root's ``slices2d``; the benchmark's photos (:data:`HOLDOUT`) never enter the training split.
Everything random comes from one ``torch.Generator``, so a seed repeats exactly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import coords
from ..intensity import normalise
from . import BENCHMARK_PHOTOS, HOLDOUT, data_root
from .synthmorph import random_map

# scikit-image name -> file in its wheel. Left out: tiny or binary images (logo, horse, text, page,
# checkerboard, microaneurysms, colorwheel): nothing a homography net should learn from.
SKIMAGE_FILES = {"astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png", "cell": "cell.png",
                 "chelsea": "chelsea.png", "clock": "clock_motion.png", "coffee": "coffee.png", "coins": "coins.png",
                 "grass": "grass.png", "gravel": "gravel.png", "hubble_deep_field": "hubble_deep_field.jpg",
                 "immunohistochemistry": "ihc.png", "moon": "moon.png", "retina": "retina.jpg",
                 "rocket": "rocket.jpg", "shepp_logan_phantom": "phantom.png",
                 "stereo_motorcycle": "motorcycle_left.png"}
MODES = ("sine", "invert", "mix", "edges")
Photo = Union[str, torch.Tensor]  # a photo name, or a (C, H, W) tensor: luminance, then RGB if any


def _skimage_dir() -> Optional[Path]:
    try:
        import skimage
    except ImportError:
        return None
    return Path(skimage.__file__).parent / "data"


def photo_names(split: str = "train") -> list[str]:
    """``"benchmark"``: the benchmark's scikit-image photos. ``"train"``: every other bundled one
    present, plus the ``slices2d`` files under the data root (relative paths; masks left out)."""
    if split == "benchmark":
        return list(BENCHMARK_PHOTOS)
    if split != "train":
        raise ValueError(f"photo split must be 'train' or 'benchmark', got {split!r}")
    from ..image import is_supported

    sk = _skimage_dir()
    names = [n for n, f in SKIMAGE_FILES.items() if sk is not None and (sk / f).is_file() and n not in HOLDOUT.photos]
    rels = [f"slices2d/{p.name}" for p in sorted((data_root() / "slices2d").glob("*"))
            if is_supported(p) and "_mask" not in p.name]
    return names + [r for r in rels if not HOLDOUT.excludes(r)]


@functools.lru_cache(maxsize=None)
def _channels(name: str) -> torch.Tensor:
    """``(C, H, W)`` in [0, 1]: luminance, then R, G, B for colour photos (for channel mixing)."""
    from ..image import read_image

    if name in SKIMAGE_FILES:
        sk = _skimage_dir()
        if sk is None:
            raise ImportError(f"photo {name!r} is one of scikit-image's: pip install scikit-image")
        path = sk / SKIMAGE_FILES[name]
    else:
        path = data_root() / name
    img = read_image(path)
    layers = [normalise(img.luminance())]
    if img.rgb:
        layers += list(normalise(img.array[..., :3].astype(np.float32)).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(layers))


def load_photo(name: str) -> np.ndarray:
    """Grey photo, float32 in [0, 1] (luminance of colour photos), cached."""
    return _channels(name)[0].numpy().copy()


def _fit(photo: torch.Tensor, short: int) -> torch.Tensor:
    """``(1, C, h, w)``: the photo resized (anti-aliased) so its short side is ``short`` px."""
    f = short / min(photo.shape[-2:])
    return coords.resize_image(photo[None], tuple(max(short, round(s * f)) for s in photo.shape[-2:]))


@functools.lru_cache(maxsize=256)
def _fitted(name: str, short: int) -> torch.Tensor:
    return _fit(_channels(name), short)


def patch_corners(size: int, view: Optional[int] = None) -> torch.Tensor:
    """``(4, 2)`` float64 (x, y) pixel centres of the central ``size`` patch of a ``view`` image."""
    lo = ((view or size) - size) / 2
    hi = lo + size - 1
    return torch.tensor([[lo, lo], [hi, lo], [hi, hi], [lo, hi]], dtype=torch.float64)


@dataclass
class PhotoPair:
    """One pair and its truth (frames in the module docstring); ``V`` is the image side."""

    moving: torch.Tensor  # (1, 1, V, V) float32
    fixed: torch.Tensor  # (1, 1, V, V) float32
    truth_matrix: torch.Tensor  # (3, 3) float64, moving px from fixed px, (x, y)
    truth_map: torch.Tensor  # (1, 2, V, V) float32, moving norm from fixed norm
    corners: torch.Tensor  # (4, 2) float64, fixed px (x, y)
    photo: str
    modality: str  # "" when none


def make_pair(photo: Photo, gen: torch.Generator, size: int = 128, rho: float = 32.0, view: Optional[int] = None,
              scale: tuple[float, float] = (1.0, 1.0), elastic: float = 0.0, photometric: float = 0.0,
              modality: float = 0.0, modes: Sequence[str] = MODES) -> PhotoPair:
    """One pair (see the module docstring) from ``photo`` (a name of :func:`photo_names`, or a
    ``(C, H, W)`` tensor in [0, 1]: luminance, then R, G, B if any), resized so its short side holds
    the moving view plus ``2 rho``; a crop is drawn again (up to 5 times) while it is flat.

    ``size``: the patch whose corners move; ``view``: the side of both images (default ``size``);
    ``scale``: range of the global scale (moving / fixed); ``elastic``: amplitude (px, at most ~ the
    std) of the smooth warp; ``photometric``: strength in [0, 1] (blur sigma <= 1.5 px, gamma, noise
    std <= 0.05); ``modality``: probability of one change drawn from ``modes``."""
    V = view or size
    # Short side of the working photo: room for the moving view (scaled, corners moved) plus 2 rho
    # for the random position, so reflection at the photo's edge is rare.
    need = (V + 2 * rho * V / size) / min(scale[0], 1.0)
    short = math.ceil(need + 2 * rho)
    big = _fitted(photo, short) if isinstance(photo, str) else _fit(photo, short)
    shape = tuple(big.shape[2:])
    corners = patch_corners(size, V)
    ident = coords.identity_map((V, V), dtype=torch.float64)
    to_norm, photo_norm = torch.from_numpy(coords.norm_from_vox((V, V))), torch.from_numpy(coords.norm_from_vox(shape))
    for _ in range(5):  # geometry first, always the same draws, so options after it keep the crop and H
        u = torch.rand(11, generator=gen, dtype=torch.float64)
        s = scale[0] + (scale[1] - scale[0]) * float(u[10])
        h = coords.fit_homography(corners, (corners - corners.mean(0)) * s + corners.mean(0) + (2 * u[2:10].view(4, 2) - 1) * rho)
        shift = torch.eye(3, dtype=torch.float64)
        shift[:2, 2] = torch.tensor([(need - V) / 2 + float(u[i]) * max(n - need, 0.0) for i, n in enumerate(shape)])
        photo_from_fixed = photo_norm @ shift @ torch.linalg.inv(to_norm)  # norm -> norm, no warp
        fixed = coords.sample(big[:, :1], coords.apply_matrix(photo_from_fixed, ident), padding_mode="reflection")
        if fixed.std() > 0.03:  # a flat crop (sky, retina's black surround) has nothing to register
            break
    pts = ident
    if elastic > 0:
        disp = random_map((V, V), gen, max_disp=2 * elastic / (V - 1), max_shift=0.0).double() - ident
        pts = ident + disp - disp.mean((2, 3), keepdim=True)  # zero mean: the homography keeps the global motion
        fixed = coords.sample(big[:, :1], coords.apply_matrix(photo_from_fixed, pts), padding_mode="reflection")
    moving_from_fixed = coords.norm_from_px(h, (V, V))  # H on norm (row, col)
    moving = coords.sample(big, coords.apply_matrix(photo_from_fixed @ torch.linalg.inv(moving_from_fixed), ident),
                           padding_mode="reflection")
    mode = ""
    if modality > 0 and float(torch.rand(1, generator=gen)) < modality:
        options = [m for m in modes if m != "mix" or big.shape[1] == 4]
        mode = options[int(torch.randint(len(options), (1,), generator=gen))] if options else ""
    moving = _photometric(_appearance(moving, mode, gen), photometric, gen)
    truth_map = coords.apply_matrix(moving_from_fixed, pts).float()
    return PhotoPair(moving, fixed.clamp(0, 1), h, truth_map, corners,
                     photo if isinstance(photo, str) else "tensor", mode)


def _appearance(chans: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """The moving image as another sensor would see it: ``(1, C, V, V)`` channels -> ``(1, 1, V, V)``."""
    x = chans[:, :1]
    if mode == "sine":  # non-monotonic: no global intensity map brings it back
        return 0.5 + 0.5 * torch.sin((2 + 2 * torch.rand(1, generator=gen)) * math.pi * x)
    if mode == "invert":
        return 1 - x
    if mode == "mix":  # random (signed) channel weights instead of luma
        x = (chans[:, 1:] * torch.randn(1, 3, 1, 1, generator=gen)).sum(1, keepdim=True)
        return (x - x.amin()) / (x.amax() - x.amin()).clamp(min=1e-6)
    if mode == "edges":  # gradient magnitude (Sobel), an edge map
        k = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8
        g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.stack([k, k.T])[:, None]).norm(dim=1, keepdim=True)
        return (g / torch.quantile(g.flatten(), 0.99).clamp(min=1e-6)).clamp(0, 1)
    return x


def _photometric(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    if strength <= 0:
        return x.clamp(0, 1)
    r = torch.rand(2, generator=gen)
    x = coords.gaussian_blur(x, 1.5 * strength * float(r[0]))
    x = x.clamp(0, 1) ** math.exp(0.25 * strength * float(torch.randn(1, generator=gen)))
    return (x + 0.05 * strength * float(r[1]) * torch.randn(x.shape, generator=gen)).clamp(0, 1)


class PhotoPairs:
    """Endless iterator of batches ``{"moving", "fixed": (B, 1, S, S), "truth_matrix": (B, 3, 3),
    "truth_map": (B, 2, S, S), "corners": (B, 4, 2)}``, float32, from the ``split``'s photos."""

    def __init__(self, split: str = "train", size: int = 128, rho: float = 32.0, batch: int = 1, seed: int = 0,
                 scale: tuple[float, float] = (1.0, 1.0), elastic: float = 0.0, photometric: float = 0.0,
                 modality: float = 0.0, modes: Sequence[str] = MODES, view: Optional[int] = None,
                 names: Optional[Sequence[str]] = None) -> None:
        self.names = list(photo_names(split) if names is None else names)
        if not self.names:
            raise ValueError(f"no {split!r} photos: install scikit-image or set the data root ({data_root()})")
        self.split, self.batch, self.seed = split, batch, seed
        self.options = dict(size=size, rho=rho, view=view, scale=tuple(scale), elastic=elastic,
                            photometric=photometric, modality=modality, modes=tuple(modes))
        self.gen = torch.Generator().manual_seed(seed)

    def describe(self) -> dict:
        return {"source": "photo pairs with a random corner-perturbation homography (DeepHomography / AltO)",
                "split": self.split, "photos": self.names, "excluded": sorted(HOLDOUT.photos), "seed": self.seed,
                "batch": self.batch, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
                "truth": "truth_matrix: moving px from fixed px (x, y); truth_map: moving norm from fixed norm"}

    def one(self) -> PhotoPair:
        name = self.names[int(torch.randint(len(self.names), (1,), generator=self.gen))]
        return make_pair(name, self.gen, **self.options)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            p = [self.one() for _ in range(self.batch)]
            yield {"moving": torch.cat([q.moving for q in p]), "fixed": torch.cat([q.fixed for q in p]),
                   "truth_matrix": torch.stack([q.truth_matrix for q in p]).float(),
                   "truth_map": torch.cat([q.truth_map for q in p]),
                   "corners": torch.stack([q.corners for q in p]).float()}
