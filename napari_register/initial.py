"""The initial alignment every method starts from: candidates, a multi-start affine fit, keep the best.

A fixed number of affine steps from the identity (the earlier design) stops short of a large offset
between subjects and never recovers a rotated section. This stage instead

1. builds candidate starts on a coarse grid: the identity (the pipeline's centre alignment, or the
   pre-alignment it was given), the moments (intensity centre of mass) translation, and in 2D the
   rotations about it (``rotations`` degrees apart; mirror images too with ``flips``);
2. scores them with the stage's similarity and fits a rotation, uniform scale and translation from
   the identity and the best others (coarse grid), each until the loss stops improving (a
   convergence test, ``iterations`` at most);
3. refines the best as an affine at the finer grid and returns it only when it scores better than
   the identity there, by its own measure and by MIND-SSC (which it did not fit): the stage never
   leaves a pair worse, by either, than where it began.

Everything happens in the ``norm`` frame of the working grid (moving_norm_from_fixed_norm matrices);
rotations assume square working voxels (2D photos and sections). Method doc: docs/methods/initial.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generator, Optional

import torch

from .coords import gaussian_blur, matrix_map, resize_image, sample
from .instance_opt import AFFINE_SECONDS, AFFINE_STEP_SECONDS, Adam, affine_shape
from .losses import mind_loss, structure
from .progress import Progress, Stage

Similarity = Callable[..., torch.Tensor]
"""``(warped, fixed, where=mask) -> loss``: a similarity of :mod:`napari_register.losses` (``where``:
the voxels where the fixed image has structure; the rest is flat background)."""


@dataclass(frozen=True)
class InitialSettings:
    """How the initial alignment searches (the method's options ``affine_*`` set these)."""

    iterations: int = 200  # most steps of one affine fit; it stops earlier once converged
    size: int = 48  # longest side of the finer grid; the candidates and starts use half of it
    rotations: Optional[float] = None  # degrees between rotation candidates; None: 30 in 2D, none in 3D
    flips: bool = False  # also try mirror images (sections mounted upside down)
    starts: int = 2  # affine fits from the identity plus this many of the best other candidates
    patience: int = 20  # steps without an improvement of ``tol`` end a fit
    tol: float = 1e-4

    def rotation_step(self, dim: int) -> float:
        if self.rotations is None:
            return 30.0 if dim == 2 else 0.0
        return float(self.rotations) if dim == 2 else 0.0

    def fits(self, dim: int) -> int:
        """Affine fits of a run (the plan's count): the starts on the coarse grid, then one refinement."""
        step = self.rotation_step(dim)
        others = (int(round(360 / step)) if step else 1) * (2 if self.flips and dim == 2 else 1)
        return 1 + min(self.starts, others) + 1


def initial_stage(shape: tuple[int, ...], settings: InitialSettings, label: str) -> Stage:
    """The planned :class:`Stage` of :func:`iter_initial` (its steps are the most it can take)."""
    d = len(shape)
    fits = settings.fits(d)
    coarse = math.prod(affine_shape(shape, max(settings.size // 2, 8)))
    fine = math.prod(affine_shape(shape, settings.size))
    steps = settings.iterations * fits
    seconds = (AFFINE_SECONDS * (coarse * (fits - 1) + fine) + AFFINE_STEP_SECONDS * fits) * settings.iterations
    return Stage(label, steps, seconds)


def _about_centre(theta: torch.Tensor, d: int) -> torch.Tensor:
    """``(d, d+1)`` parameters (A - I | t) -> homogeneous matrix of A about the grid centre, plus t."""
    lin = torch.eye(d, dtype=theta.dtype, device=theta.device) + theta[:, :d]
    centre = torch.full((d,), 0.5, dtype=theta.dtype, device=theta.device)
    top = torch.cat([lin, (centre - lin @ centre + theta[:, d])[:, None]], dim=1)
    bottom = torch.zeros(1, d + 1, dtype=theta.dtype, device=theta.device)
    bottom[0, d] = 1.0
    return torch.cat([top, bottom], dim=0)


def centre_of_mass(image: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre ``(d,)`` of a ``(1, 1, *S)`` image in norm coordinates (above the
    image's median, so a bright background does not pull it to the middle)."""
    d = image.dim() - 2
    w = (image[0, 0] - image.median()).clamp_min(0)
    if float(w.sum()) <= 0:
        return torch.full((d,), 0.5, dtype=image.dtype, device=image.device)
    axes = [torch.linspace(0, 1, s, dtype=image.dtype, device=image.device) for s in image.shape[2:]]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([(g * w).sum() / w.sum() for g in grids])


def candidates(moving: torch.Tensor, fixed: torch.Tensor, settings: InitialSettings) -> list[torch.Tensor]:
    """Candidate start matrices (norm frame, moving from fixed), the moments translation first:
    it maps the fixed image's centre of mass onto the moving one's, then each rotation (and mirror)
    about that centre (square working voxels)."""
    d = fixed.dim() - 2
    c_f, c_m = centre_of_mass(fixed), centre_of_mass(moving)
    out = []
    step = settings.rotation_step(d)
    angles = [k * step for k in range(int(round(360 / step)))] if step else [0.0]
    scale = torch.tensor([max(s - 1, 1) for s in fixed.shape[2:]], dtype=fixed.dtype, device=fixed.device)
    for flip in ((False, True) if settings.flips and d == 2 else (False,)):
        for angle in angles:
            lin = torch.eye(d, dtype=fixed.dtype, device=fixed.device)
            if d == 2:
                a = math.radians(angle)
                rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=fixed.dtype)
                if flip:
                    rot = rot @ torch.diag(torch.tensor([1.0, -1.0], dtype=fixed.dtype))
                lin = (rot / scale[None, :]) * scale[:, None]  # voxel units -> norm: S^-1 R S
                lin = lin.to(fixed.device)
            m = torch.eye(d + 1, dtype=fixed.dtype, device=fixed.device)
            m[:d, :d] = lin
            m[:d, d] = c_m - lin @ c_f
            out.append(m)
    return out


def _score(moving: torch.Tensor, fixed: torch.Tensor, matrix: torch.Tensor, similarity: Similarity) -> float:
    """The similarity of the warped moving image, where the fixed image has structure."""
    with torch.no_grad():
        warped = sample(moving, matrix_map(matrix, tuple(fixed.shape[2:])))
        return float(similarity(warped, fixed, where=structure(fixed)))


def _similarity_about_centre(params: torch.Tensor, d: int, scale: torch.Tensor) -> torch.Tensor:
    """``(d + d(d-1)/2 + 1,)`` parameters (translation, rotation angles, log scale) -> homogeneous
    matrix of a rotation and uniform scaling about the grid centre (in voxel units, so it stays a
    rotation on the working grid's square voxels), plus the translation (norm units)."""
    k = d * (d - 1) // 2
    skew = torch.zeros(d, d, dtype=params.dtype, device=params.device)
    iu = torch.triu_indices(d, d, 1)
    skew = skew.index_put((iu[0], iu[1]), params[d:d + k])
    skew = skew - skew.T
    rot = torch.matrix_exp(skew) * torch.exp(params[d + k])
    lin = rot / scale[None, :] * scale[:, None]
    theta = torch.cat([lin - torch.eye(d, dtype=params.dtype, device=params.device), params[:d, None]], dim=1)
    return _about_centre(theta, d)


def iter_fit(moving: torch.Tensor, fixed: torch.Tensor, start: torch.Tensor, similarity: Similarity,
             settings: InitialSettings, stage: str, counter: list[int], total: int, lr: float = 0.01,
             rigid: bool = False) -> Generator[Progress, None, tuple[torch.Tensor, float]]:
    """One fit ``start @ A`` (A about the centre: an affine, or with ``rigid`` a rotation, uniform
    scale and translation, which cannot shrink the image onto a flat region) by Adam until the loss
    has not improved by ``tol`` for ``patience`` steps (``iterations`` at most); returns the best
    matrix and its loss. ``counter``: the stage's step count, shared by the fits of a run."""
    d = fixed.dim() - 2
    shape = tuple(fixed.shape[2:])
    scale = torch.tensor([max(s - 1, 1) for s in shape], dtype=fixed.dtype, device=fixed.device)
    n = d + d * (d - 1) // 2 + 1
    theta = torch.zeros((n,) if rigid else (d, d + 1), dtype=fixed.dtype, device=fixed.device, requires_grad=True)
    opt = Adam([theta], lr=lr)
    where = structure(fixed)
    best, best_loss, since = start, math.inf, 0
    for i in range(settings.iterations):
        for group in opt.param_groups:  # linear decay lr -> lr / 10 over the most steps a fit takes
            group["lr"] = lr * (1.0 - 0.9 * i / max(settings.iterations - 1, 1))
        opt.zero_grad()
        a = _similarity_about_centre(theta, d, scale) if rigid else _about_centre(theta, d)
        m = start @ a
        loss = similarity(sample(moving, matrix_map(m, shape)), fixed, where=where)
        if not torch.isfinite(loss):
            break
        value = float(loss.detach())
        if value < best_loss - settings.tol:
            best, best_loss, since = m.detach(), value, 0
        else:
            since += 1
        counter[0] += 1
        yield Progress(stage, min(counter[0], total), total, value, None)
        if since >= settings.patience:
            break
        loss.backward()
        opt.step()
    return best, best_loss


def iter_initial(moving: torch.Tensor, fixed: torch.Tensor, similarity: Similarity,
                 settings: InitialSettings = InitialSettings(), stage: str = "affine",
                 ) -> Generator[Progress, None, torch.Tensor]:
    """The initial alignment of ``moving`` onto ``fixed`` (``(1, 1, *S)``, already on one grid):
    returns the ``(d+1, d+1)`` moving_norm_from_fixed_norm matrix (the identity when nothing beats it).
    Yields progress steps of one stage, ``stage``, ending at its planned total."""
    shape = tuple(fixed.shape[2:])
    d = len(shape)
    total = settings.iterations * settings.fits(d)
    counter = [0]
    eye = torch.eye(d + 1, dtype=fixed.dtype, device=fixed.device)
    # coarse: candidates scored on blurred images (smoother landscape), then the starts fitted
    cshape = affine_shape(shape, max(settings.size // 2, 8))
    mov_c, fix_c = resize_image(moving, cshape), resize_image(fixed, cshape)
    blur = lambda x: gaussian_blur(x, 1.0)  # noqa: E731
    cands = candidates(mov_c, fix_c, settings)
    ranked = sorted(cands, key=lambda m: _score(blur(mov_c), blur(fix_c), m, similarity))
    starts = [eye] + ranked[: settings.starts]
    fits = []
    for m0 in starts:
        fits.append((yield from iter_fit(mov_c, fix_c, m0, similarity, settings, stage, counter, total, rigid=True)))
    best = min(fits, key=lambda f: f[1])[0]
    # fine: refine the best, then keep it only where it beats the identity
    fshape = affine_shape(shape, settings.size)
    mov_f, fix_f = resize_image(moving, fshape), resize_image(fixed, fshape)
    refined, loss = yield from iter_fit(mov_f, fix_f, best, similarity, settings, stage, counter, total)
    identity_loss = _score(mov_f, fix_f, eye, similarity)
    yield Progress(stage, total, total, min(loss, identity_loss), None)
    # kept only where it beats the identity by its own measure and by MIND-SSC, which it did not fit:
    # an LNCC fit can match the surrounding tissue better and the organ worse
    better = loss < identity_loss and _score(mov_f, fix_f, refined, mind_loss) <= _score(mov_f, fix_f, eye, mind_loss)
    return refined if better else eye
