"""SynthMorph-style synthetic images: a random label map (argmax of smooth noise) rendered with
random per-label intensities, random smooth maps to deform them, and per-image corruption (bias,
gamma, noise). 2D and 3D alike; every image is ``(1, 1, *shape)`` in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import coords


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


def random_rigid_map(shape: tuple[int, ...], gen: torch.Generator, max_angle: float = 10.0, max_shift: float = 0.08,
                     max_scale: float = 0.08, max_disp: float = 3.0) -> torch.Tensor:
    """Map ``(1, d, *shape)`` in the norm frame: a rotation about the centre (up to ``max_angle``
    degrees about each axis, in voxel space so it stays a rotation on anisotropic grids), an
    isotropic scale within ``1 +- max_scale``, a translation up to ``max_shift`` of each axis and a
    smooth random deformation up to ~``max_disp`` voxels: RAN's synthetic pre-training fields."""
    d = len(shape)
    n = torch.tensor([max(s - 1, 1) for s in shape], dtype=torch.float32).view(1, d, *[1] * d)
    vox = coords.identity_map(shape) * n
    centre = n / 2
    angles = (torch.rand(3 if d == 3 else 1, generator=gen) * 2 - 1) * max_angle * torch.pi / 180
    rot = torch.eye(d)
    planes = [(0, 1)] if d == 2 else [(1, 2), (0, 2), (0, 1)]
    for a, (i, j) in zip(angles, planes):
        r = torch.eye(d)
        r[i, i] = r[j, j] = torch.cos(a)
        r[i, j], r[j, i] = -torch.sin(a), torch.sin(a)
        rot = r @ rot
    scale = 1 + (float(torch.rand(1, generator=gen)) * 2 - 1) * max_scale
    shift = (torch.rand(d, generator=gen) * 2 - 1).view(1, d, *[1] * d) * max_shift * n
    moved = torch.einsum("ij,bj...->bi...", rot * scale, vox - centre) + centre + shift
    coarse = int(torch.randint(3, 7, (1,), generator=gen))
    amp = max_disp * float(torch.rand(1, generator=gen))
    moved = moved + amp * smooth_noise(shape, d, coarse, gen)
    return moved / n
