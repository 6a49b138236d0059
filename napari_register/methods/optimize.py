"""``optimize``: no network; multi-resolution optimisation of a stationary velocity field.

The map is ``exp(v)`` by scaling and squaring, which keeps it diffeomorphic (few folds) where a raw
displacement would fold. Similarity is LNCC (same modality) or MIND-SSC (multimodal), regularised by
the diffusion energy of ``v``. Coarse levels find the large motion cheaply; finer levels refine.
The same loop (:func:`napari_register.instance_opt.iter_optimise`) fine-tunes the networks.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Generator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..coords import apply_matrix, compose, gaussian_blur, resize_image, resize_map, sample
from ..errors import InputError
from ..initial import InitialSettings, initial_stage, iter_initial
from ..instance_opt import FieldAdam, iter_optimise
from ..losses import diffusion, get_similarity
from ..progress import Progress, Stage
from .blocks import svf_exp
from .registry import Method, MethodOutput, register_method


def _vox_to_norm(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([1.0 / max(s - 1, 1) for s in shape], device=device).view(1, -1, *([1] * len(shape)))


def _level_window(window: int, finest: float, factor: float) -> int:
    """The LNCC window (voxels, odd, >= 3) at a level ``factor`` times coarser than the working grid
    that spans about as much of the image as ``window`` voxels at the finest level ``finest``."""
    return max(3, 2 * int(round((window * finest / factor - 1) / 2)) + 1)


# Defaults by task family, (dim, multimodal: similarity "mind") -> settings, chosen on the broad
# benchmark's dev split (docs/methods/initial.md#choosing-the-defaults); options override them.
# 3D multimodal has no affine stage: every affine fit tried moved MR -> ultrasound glands off their
# centre alignment.
FAMILY_DEFAULTS: dict[tuple[int, bool], dict[str, Any]] = {
    (3, False): {"smooth": 1.0, "affine_iterations": 200},
    (3, True): {"smooth": 2.0, "affine_iterations": 0},
    (2, False): {"smooth": 2.0, "affine_iterations": 200},
    (2, True): {"smooth": 2.0, "affine_iterations": 200},
}


@register_method("optimize")
class Optimize(Method):
    """Instance optimisation from identity (or from a previous result)."""

    dims = (2, 3)
    description = "multi-resolution stationary-velocity-field optimisation (no network)"
    default_io_steps = 0

    def __init__(self, dim: int, device: torch.device, checkpoint: Any = None, *,
                 similarity: str = "lncc", levels: Sequence[int] = (4, 2), iterations: Sequence[int] = (30, 8),
                 lr: float = 0.5, smooth: Optional[float] = None, max_size: int | None = None, grid: int = 1,
                 window: int = 5, eps: float = 1e-5, affine_iterations: Optional[int] = None, affine_size: int = 48,
                 affine_window: int = 9, affine_rotations: Optional[float] = None, affine_flips: bool = False,
                 affine_similarity: str = "lncc", affine_starts: int = 2, sigma: float = 1.0,
                 exp_max_gradient: float = 2.0, **options: Any) -> None:
        super().__init__(dim, device, None, **options)
        if checkpoint not in (None, "", "none"):
            raise InputError("method 'optimize' uses no checkpoint; leave --checkpoint out")
        if len(levels) != len(iterations):
            raise ValueError(f"levels {levels} and iterations {iterations} must have the same length")
        self.similarity_name = similarity
        lncc_args = lambda w: {"window": w, "eps": eps} if similarity == "lncc" else {}  # noqa: E731
        self.similarity = get_similarity(similarity, **lncc_args(window))
        aff = affine_similarity
        self.affine_similarity = get_similarity(aff, **({"window": affine_window, "eps": eps} if aff == "lncc" else {}))
        self.levels = tuple(int(x) for x in levels)
        self.iterations = tuple(int(x) for x in iterations)
        # LNCC's window is ``window`` voxels at the finest level and spans about the same extent of the
        # image at coarser ones (odd, >= 3 voxels): a fixed 5-voxel window spanned 20 working voxels at
        # the 4x level, twice the finest level's 10, and that coarse match pulled inter-subject prostate
        # glands off their affine fit. Prostate Dice 0.728 -> 0.753, OASIS 0.676 -> 0.677, histology TRE
        # 21.9 -> 21.7 px, same time (docs/methods/optimize.md).
        finest = min(self.levels, default=1)
        self.level_similarity = {f: get_similarity(similarity, **lncc_args(_level_window(window, finest, f)))
                                 for f in self.levels}
        self.lr = lr
        family = FAMILY_DEFAULTS[(dim, similarity == "mind")]
        self.smooth = float(family["smooth"] if smooth is None else smooth)
        # The initial alignment (napari_register.initial), as ANTs' SyN starts from an affine;
        # ``affine_iterations`` is the most steps of one affine fit, 0 skips the stage.
        if affine_iterations is None:
            affine_iterations = family["affine_iterations"]
        self.affine_iterations = int(affine_iterations)
        self.affine_size = int(affine_size)
        self.initial = InitialSettings(iterations=self.affine_iterations, size=self.affine_size,
                                       rotations=affine_rotations, flips=bool(affine_flips),
                                       starts=int(affine_starts))
        # v = G_sigma * w: the Gaussian spreads each update over its neighbours (as demons smooth
        # their updates), so motion found where the images have structure reaches flat regions.
        self.sigma = float(sigma)
        # Squarings resample the whole field, the bulk of an iteration's cost. While optimising, a
        # coarse exp (Euler step's largest voxel-to-voxel change <= 2) suffices; the final map is
        # exponentiated finely (<= 0.25). Against <= 1: OASIS registration 9.5 -> 7.6 s, Dice 0.6764 ->
        # 0.6761; prostate 0.753 -> 0.752, histology 21.73 -> 21.76 px, fewer folds on all three;
        # exponentiating finely throughout costs 40 % more time again for the same Dice.
        self.exp_max_gradient = float(exp_max_gradient)
        self.grid = int(grid)  # velocity control grid: ``grid`` times coarser than the images of a level
        self.max_size = max_size or (192 if dim == 3 else 1024)

    def working_shape(self, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
        scale = min(1.0, self.max_size / max(shape))
        return tuple(max(int(round(s * scale)), 8) for s in shape)

    def memory_bytes(self, shape: tuple[int, ...], io_steps: int) -> int:
        # Measured peaks (CPU, 3D): ~40 B per working voxel (images, prior map) plus ~250 B per voxel of
        # the finest level (velocity, its exp, gradients, optimiser state).
        finest = math.prod(self._level_shape(shape, min(self.levels)))
        return 40 * math.prod(shape) + 250 * finest

    # seconds per voxel of a level's grid and iteration on the reference CPU (2 threads), by
    # dimensionality (OASIS and histology pairs)
    LEVEL_SECONDS = {2: 3.2e-7, 3: 8.2e-7}

    def _schedule(self, io_steps: int, continuing: bool) -> list[tuple[int, int]]:
        """``(level factor, iterations)`` of a run: a continued one refines at the finest level only."""
        if continuing:
            return [(self.levels[-1], max(io_steps, 1))]
        schedule = list(zip(self.levels, self.iterations))
        schedule[-1] = (schedule[-1][0], schedule[-1][1] + io_steps)
        return schedule

    def plan(self, shape: tuple[int, ...], io_steps: int, continuing: bool = False) -> list[Stage]:
        schedule = self._schedule(io_steps, continuing)
        stages = []
        if self.affine_iterations and not continuing:
            stages.append(initial_stage(shape, self.initial, "optimize affine"))
        for li, (factor, iters) in enumerate(schedule):
            voxels = math.prod(self._level_shape(shape, factor))
            stages.append(Stage(f"optimize level {li + 1}/{len(schedule)}", iters, self.LEVEL_SECONDS[self.dim] * voxels * iters))
        return stages

    def _level_shape(self, shape: tuple[int, ...], factor: float) -> tuple[int, ...]:
        return tuple(max(int(round(s / factor)), 4) for s in shape)

    def iter_run(self, moving: torch.Tensor, fixed: torch.Tensor, io_steps: int,
                 init: MethodOutput | None = None) -> Generator[Progress, None, MethodOutput]:
        shape = tuple(fixed.shape[2:])
        d = len(shape)
        schedule = self._schedule(io_steps, init is not None)
        # The transform the velocity field refines, applied after it: ``phi -> prior(phi)``.
        prior: Callable[[torch.Tensor], torch.Tensor] | None = None
        if init is not None:  # continue from a previous result: finest level, io_steps more iterations
            prior = lambda phi: compose(resize_map(init.map, tuple(phi.shape[2:])), phi)  # noqa: E731
        else:
            if self.affine_iterations:
                m = yield from iter_initial(moving, fixed, self.affine_similarity, self.initial, "optimize affine")
                prior = lambda phi: apply_matrix(m, phi)  # noqa: E731
        velocity = None  # in voxel units of the current velocity grid, array-order channels
        loss = float("nan")
        for li, (factor, iters) in enumerate(schedule):
            lshape = self._level_shape(shape, factor)
            vshape = self._level_shape(shape, factor * self.grid)
            fix_l, mov_l = resize_image(fixed, lshape), resize_image(moving, lshape)
            if velocity is None:
                velocity = torch.zeros(1, d, *vshape, device=fixed.device)
            else:  # upsample, rescaling voxel units to the new grid
                old = velocity.shape[2:]
                scale = torch.tensor([(n - 1) / max(o - 1, 1) for n, o in zip(vshape, old)],
                                     device=fixed.device).view(1, d, *([1] * d))
                velocity = F.interpolate(velocity, size=vshape, mode="trilinear" if d == 3 else "bilinear",
                                         align_corners=True) * scale
            velocity = velocity.detach().requires_grad_(True)
            to_norm = _vox_to_norm(vshape, fixed.device)
            similarity = self.level_similarity.get(factor, self.similarity)

            def loss_fn(velocity=velocity, mov_l=mov_l, fix_l=fix_l, to_norm=to_norm, similarity=similarity):
                v = gaussian_blur(velocity, self.sigma) * to_norm
                phi = resize_map(svf_exp(v, max_gradient=self.exp_max_gradient), tuple(fix_l.shape[2:]))
                if prior is not None:
                    phi = prior(phi)
                reg = diffusion(v)
                return similarity(sample(mov_l, phi), fix_l) + self.smooth * reg, phi

            stage = f"optimize level {li + 1}/{len(schedule)} ({'x'.join(map(str, lshape))})"
            loss = yield from iter_optimise([velocity], loss_fn, iters, self.lr, stage=stage,
                                          lr_end=0.1 * self.lr, optimizer=FieldAdam)
        with torch.no_grad():
            v = gaussian_blur(velocity, self.sigma) * _vox_to_norm(tuple(velocity.shape[2:]), fixed.device)
            # exp on the velocity grid, then upsampled: the map is as smooth as v, and squaring at
            # the full grid would cost seconds on a brain
            phi = resize_map(svf_exp(v), shape)
            if prior is not None:
                phi = prior(phi)
        return MethodOutput(map=phi, loss=loss)
