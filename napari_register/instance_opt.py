"""Per-pair optimisation loop shared by every method: the ``optimize`` baseline optimises a field,
network methods fine-tune a *copy* of their network (the shipped model is never changed in place).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Generator, Iterable

import torch

from .coords import matrix_map, resize_image, sample
from .progress import Progress

LossFn = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""Returns ``(loss, map)``: the scalar to minimise and the current fixed->moving map (for previews)."""


class Adam:
    """Adam (no weight decay) on a few tensors, without ``torch.optim``: creating a ``torch.optim``
    optimiser imports ``torch._dynamo``, 1.1 s of every command that runs ``optimize`` (measured),
    more than its whole affine stage. The same update as ``torch.optim.Adam``; ``param_groups`` so
    :func:`iter_optimise`'s schedule sets the rate."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param_groups = [dict(params=list(params), lr=lr, betas=betas, eps=eps)]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None

    def _square(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * grad

    def _direction(self, m_hat: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
        return m_hat / rms

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state.setdefault(p, {"t": 0, "m": torch.zeros_like(p), "v": 0.0})
            st["t"] += 1
            st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
            st["v"] = b2 * st["v"] + (1 - b2) * self._square(p.grad)
            m_hat = st["m"] / (1 - b1 ** st["t"])
            rms = (st["v"] / (1 - b2 ** st["t"])).sqrt() + group["eps"]
            p.sub_(self._direction(m_hat, rms), alpha=group["lr"])


class FieldAdam(Adam):
    """Adam whose second moment is the mean over each whole tensor, steps clipped to ``lr``.

    Plain Adam normalises every parameter by its own gradient history, so a voxel of a field whose
    gradient is only numerical noise (flat background, an identity pair) still moves ``lr`` per
    step. Normalising by the tensor's RMS keeps the steps proportional to the gradient instead.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-12) -> None:
        super().__init__(params, lr, betas, eps)

    def _square(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.pow(2).mean()

    def _direction(self, m_hat: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
        return (m_hat / rms).clamp_(-1, 1)


def iter_optimise(params: Iterable[torch.nn.Parameter], loss_fn: LossFn, steps: int, lr: float,
                  stage: str = "instance optimisation", preview_every: int = 10, lr_end: float | None = None,
                  optimizer: Callable[..., Any] = torch.optim.Adam, warmup: int = 0,
                  ) -> Generator[Progress, None, float]:
    """Adam on ``params`` for ``steps`` steps; yields Progress (with the map every ``preview_every``
    steps and at the last) and returns the final loss. ``lr_end``: decay the rate linearly to it, which
    quiets Adam's sign-like steps where the gradient is only noise (flat background). ``warmup``: ramp
    the rate up linearly over that many first steps (Adam's first steps move every weight by about
    ``lr`` whatever its gradient, which can first undo what a trained network had). ``optimizer``:
    a ``torch.optim`` class or :class:`Adam` / :class:`FieldAdam` (anything with ``param_groups``)."""
    params = list(params)
    opt = optimizer(params, lr=lr)
    end = lr if lr_end is None else lr_end

    def factor(i: int) -> float:  # linear decay lr -> end, times the warm-up ramp
        return (1.0 + (end / lr - 1.0) * min(i / max(steps - 1, 1), 1.0)) * min(1.0, (i + 1) / (warmup + 1))

    loss_value = float("nan")
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss, phi = loss_fn()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage}: loss became {loss.item()} at step {step}; "
                                     "lower the learning rate or check the inputs for NaN")
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * factor(step - 1)
        opt.step()
        loss_value = float(loss.detach())
        show = step == steps or (preview_every and step % preview_every == 0)
        yield Progress(stage, step, steps, loss_value, phi.detach() if show else None)
    return loss_value


def finetune_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A trainable deep copy of ``model`` for instance optimisation; the original is untouched."""
    clone = copy.deepcopy(model)
    clone.train()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def affine_shape(shape: tuple[int, ...], size: int = 48) -> tuple[int, ...]:
    """The coarse grid :func:`iter_affine` works on: longest side about ``size``."""
    f = max(max(shape) / size, 1.0)
    return tuple(max(int(round(s / f)), 4) for s in shape)


# seconds per voxel of the affine grid and step, and per step, on the reference CPU (2 threads;
# OASIS and histology pairs)
AFFINE_SECONDS, AFFINE_STEP_SECONDS = 2e-7, 1e-3


def iter_affine(moving: torch.Tensor, fixed: torch.Tensor, similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                iterations: int = 50, size: int = 48, stage: str = "affine") -> Generator[Progress, None, torch.Tensor]:
    """A plain affine fit of ``moving`` onto ``fixed`` (``(1, 1, *S)``): a fixed number of Adam steps
    from the identity (the methods start from :func:`napari_register.initial.iter_initial` instead); returns the ``(d+1, d+1)`` moving_norm_from_fixed_norm matrix, about the grid centre.

    It sees only the coarse shape of the images: a grid whose longest side is about ``size``."""
    shape = tuple(fixed.shape[2:])
    d = len(shape)
    ashape = affine_shape(shape, size)
    fix_a, mov_a = resize_image(fixed, ashape), resize_image(moving, ashape)
    theta = torch.zeros(d, d + 1, device=fixed.device, requires_grad=True)  # A - I | t
    centre = torch.full((d,), 0.5, device=fixed.device)

    def matrix() -> torch.Tensor:
        lin = torch.eye(d, device=fixed.device) + theta[:, :d]
        top = torch.cat([lin, (centre - lin @ centre + theta[:, d])[:, None]], dim=1)
        bottom = torch.zeros(1, d + 1, device=fixed.device)
        bottom[0, d] = 1.0
        return torch.cat([top, bottom], dim=0)

    def loss_fn() -> tuple[torch.Tensor, torch.Tensor]:
        phi = matrix_map(matrix(), ashape)
        return similarity(sample(mov_a, phi), fix_a), phi

    yield from iter_optimise([theta], loss_fn, iterations, 0.01, stage=f"{stage} ({'x'.join(map(str, ashape))})",
                             lr_end=0.001, optimizer=Adam)
    return matrix().detach()


def iter_corner_fit(moving: torch.Tensor, fixed: torch.Tensor, matrix: torch.Tensor, steps: int,
                    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lr: float = 0.5,
                    blur: float = 8.0, stage: str = "homography fit", preview_every: int = 10,
                    full: Callable[[torch.Tensor], torch.Tensor] = lambda m: m, keep_better: bool = False,
                    ) -> Generator[Progress, None, tuple[torch.Tensor, float]]:
    """Refine a 2D homography on one pair by its four corner offsets (8 numbers, so it stays a
    homography), starting from ``matrix`` (norm frame, moving from fixed). ``similarity`` between
    the warped moving and the fixed image, both blurred by a Gaussian whose sigma falls linearly
    from ``blur`` px to 0 (coarse first: the fit reaches a minimum several px away); Adam at ``lr``
    px per step. ``full`` maps the matrix to what previews show (e.g. after a pre-stage).
    ``keep_better``: return the start instead when the fit ends with a worse (unblurred) similarity
    than it began with: the coarse start can pull a good estimate into another basin. Returns
    ``(matrix, final loss)``."""
    from .coords import apply_matrix, corner_homography, corners_px, gaussian_blur, norm_from_px, px_from_norm

    shape = tuple(fixed.shape[2:])
    corners = corners_px(shape).to(fixed.device)
    start = px_from_norm(matrix.double(), shape)
    # the start's corner offsets, px (x, y): the corners as a map (1, 2, 4) through its px matrix
    base = (apply_matrix(start, corners.T[None])[0].T - corners)[None]
    delta = torch.zeros_like(base, requires_grad=True)
    step = [0]

    def current() -> torch.Tensor:
        return norm_from_px(corner_homography(base + delta, shape), shape)[0].to(fixed.dtype)

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        mat = current()
        warped = sample(moving, matrix_map(mat, shape))
        sigma = blur * max(0.0, 1.0 - step[0] / steps)
        step[0] += 1
        if sigma > 0.3:
            value = similarity(gaussian_blur(warped, sigma), gaussian_blur(fixed, sigma))
        else:
            value = similarity(warped, fixed)
        return value, matrix_map(full(mat.detach()), shape)

    before = None
    if keep_better:
        with torch.no_grad():
            before = float(similarity(sample(moving, matrix_map(current(), shape)), fixed))
    loss = yield from iter_optimise([delta], objective, steps, lr, stage=stage, preview_every=preview_every)
    with torch.no_grad():
        if before is not None and float(similarity(sample(moving, matrix_map(current(), shape)), fixed)) > before:
            return matrix.to(fixed.dtype), before
        return current(), loss
