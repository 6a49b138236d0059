"""The one registration pipeline every front end (widget, CLI, benchmark) goes through.

``iter_register`` is a generator: it yields :class:`Progress` while it works and *returns* a
:class:`RegistrationResult` (``result = yield from iter_register(...)``, or use :func:`register`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Optional

import numpy as np
import torch

from .coords import Geometry, identity_map, resize_image, resize_map
from .image import Image, ImageError, check_registrable, read_image
from .intensity import normalise
from .metrics import fold_fraction
from .methods.registry import Method, MethodOutput, get_method
from .progress import Cancelled, Progress
from .transforms import Composite, DisplacementField, MatrixTransform, Transform, warp_image


@dataclass
class RegistrationResult:
    """Everything a run produced, in the fixed image's physical frame."""

    transform: Transform  # moving_from_fixed, physical; a DisplacementField or a MatrixTransform chain
    field: DisplacementField  # the same transform as a dense field on the fixed grid
    warped: Image
    jacobian: Image
    fold_fraction: float
    seconds: float
    method: str
    checkpoint: Optional[str]
    io_steps: int
    device: str
    fixed: Image
    moving: Image
    output: MethodOutput = field(repr=False)  # working-resolution output, to continue from
    loss: Optional[float] = None

    def warp_labels(self, labels: Image) -> Image:
        """Warp a moving label map (nearest neighbour, label set kept) onto the fixed grid."""
        return warp_image(labels, self.transform, self.fixed.geometry, labels=True)

    def map_points(self, fixed_points: np.ndarray) -> np.ndarray:
        """Fixed physical points ``(N, d)`` -> where they land in the moving image."""
        return self.transform.moving_from_fixed(np.asarray(fixed_points, dtype=np.float64))

    def map_points_inverse(self, moving_points: np.ndarray) -> np.ndarray:
        """Moving physical points -> fixed physical points (inverse, by fixed-point iteration)."""
        return self.transform.fixed_from_moving(np.asarray(moving_points, dtype=np.float64))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def centre_alignment(moving: Geometry, fixed: Geometry) -> MatrixTransform:
    """Translation that puts the centre of the moving grid on the centre of the fixed grid."""
    return MatrixTransform.translation(moving.center_phys() - fixed.center_phys())


def _as_image(x: Image | str | Path, role: str) -> Image:
    img = x if isinstance(x, Image) else read_image(x)
    check_registrable(img, role)
    return img


def _working_tensor(image: Image, transform: Transform | None, fixed: Geometry, shape: tuple[int, ...],
                    device: torch.device) -> torch.Tensor:
    """Luminance, normalised, resampled onto the fixed grid (through ``transform``), then to ``shape``."""
    lum = image.with_array(image.luminance(), channels=False, rgb=False)
    if transform is not None:
        lum = warp_image(lum, transform, fixed)
    t = torch.from_numpy(normalise(lum.array))[None, None]
    return resize_image(t, shape).to(device)


def _physical_transform(out: MethodOutput, fixed: Geometry, init: MatrixTransform, shape: tuple[int, ...]
                        ) -> tuple[Transform, DisplacementField]:
    """Working-resolution output -> physical ``moving_from_fixed`` transform and its dense field."""
    work = fixed.with_shape(shape)
    if out.matrix is not None:
        m = out.matrix.detach().double().cpu().numpy()
        # fixed phys -> working norm -> (method) -> working norm -> phys (moving, centre-aligned) -> moving
        phys = work.phys_from_norm() @ m @ work.norm_from_phys()
        transform: Transform = Composite([MatrixTransform(phys), init])
        return transform, transform.to_field(fixed)
    d = fixed.ndim
    phi = resize_map(out.map.detach().float().cpu(), fixed.shape)[0]  # (d, *shape) norm, fixed grid
    ident = identity_map(fixed.shape)[0]
    # disp(x) = A phi(x) - P x with P = phys_from_norm (fixed), A = init o P; written as
    # A_lin (phi - x) + (A - P) x so float32 never subtracts two large physical coordinates.
    p_m = fixed.phys_from_norm()
    a_m = init.matrix @ p_m
    a_lin = torch.from_numpy(a_m[:d, :d].astype(np.float32))
    diff_lin = torch.from_numpy((a_m - p_m)[:d, :d].astype(np.float32))
    diff_t = torch.from_numpy((a_m - p_m)[:d, d].astype(np.float32))
    disp = (torch.einsum("ij,j...->...i", a_lin, phi - ident)
            + torch.einsum("ij,j...->...i", diff_lin, ident) + diff_t)
    dense = DisplacementField(fixed, disp.contiguous().numpy())
    return dense, dense


def iter_register(moving: Image | str | Path, fixed: Image | str | Path, method: str | Method = "optimize",
                  checkpoint: str | Path | None = None, io_steps: int | None = None,
                  device: str | torch.device = "auto", cancel: Callable[[], bool] | None = None,
                  previews: bool = False, init: RegistrationResult | None = None,
                  options: dict[str, Any] | None = None,
                  ) -> Generator[Progress, None, RegistrationResult]:
    """Register ``moving`` onto ``fixed``; yields :class:`Progress`, returns a :class:`RegistrationResult`.

    The moving image is first centre-aligned onto the fixed image's physical grid, intensities are
    clipped to robust percentiles, both are resized to the method's working grid, and the method's
    map is brought back to the fixed image's native grid in physical units.

    ``cancel``: polled at every progress step; when it returns True, :class:`Cancelled` is raised.
    ``previews``: progress steps that carry a map also carry ``progress.warped``, the moving image
    warped onto the working grid (the fixed image's extent at the method's resolution, for live display). ``init``: a previous result on the same pair
    to continue from (instance optimisation of the current result). ``method``: a registered name,
    or a method instance to reuse (its network stays loaded across pairs; ``checkpoint`` and
    ``options`` then belong to it and must be left out).
    """
    start = time.perf_counter()
    mov = _as_image(moving, "moving")
    fix = _as_image(fixed, "fixed")
    if mov.ndim != fix.ndim:
        raise ImageError(f"moving image {mov.name} is {mov.ndim}D but fixed image {fix.name} is {fix.ndim}D; "
                         "register 2D with 2D and 3D with 3D")
    dev = resolve_device(device)
    if isinstance(method, Method):
        if checkpoint is not None or options:
            raise ValueError("pass checkpoint and options when creating the method instance, not with it")
        algo, cls, dev = method, type(method), method.device
        if algo.dim != fix.ndim:
            raise ValueError(f"the {algo.name!r} instance registers {algo.dim}D images, these are {fix.ndim}D")
    else:
        cls = get_method(method)
        if fix.ndim not in cls.dims:
            from .methods.registry import list_methods

            raise ValueError(f"method {method!r} does not register {fix.ndim}D images; "
                             f"methods for {fix.ndim}D: {', '.join(list_methods(fix.ndim))}")
        algo = cls(fix.ndim, dev, checkpoint, **(options or {}))
    method = cls.name
    steps = cls.default_io_steps if io_steps is None else int(io_steps)
    if steps < 0:
        raise ValueError(f"io_steps must be >= 0, got {steps}")
    init_tx = centre_alignment(mov.geometry, fix.geometry)
    shape = tuple(algo.working_shape(fix.shape, fix.geometry.spacing))
    init_out = None
    if init is not None:
        if init.output.map.shape[2:] != shape or init.method != method:
            raise ValueError("init: the previous result comes from another method or working grid; "
                             "continue only a result of the same method on the same pair")
        init_out = init.output
    yield Progress("preparing", 0, 1)
    fixed_t = _working_tensor(fix, None, fix.geometry, shape, dev)
    moving_t = _working_tensor(mov, init_tx, fix.geometry, shape, dev)
    gen = algo.iter_run(moving_t, fixed_t, steps, init=init_out)
    while True:
        if cancel is not None and cancel():
            gen.close()
            raise Cancelled("registration cancelled")
        try:
            progress = next(gen)
        except StopIteration as stop:
            out = stop.value
            break
        if previews and progress.map is not None:
            # On the working grid (same physical extent): a full-resolution warp per preview would
            # cost seconds on a brain and delay Cancel.
            work = fix.geometry.with_shape(shape)
            tx, _ = _physical_transform(MethodOutput(map=progress.map), work, init_tx, shape)
            progress.warped = warp_image(mov, tx, work)
            if cancel is not None and cancel():
                gen.close()
                raise Cancelled("registration cancelled")
        yield progress
    if not isinstance(out, MethodOutput):
        raise TypeError(f"method {method!r} returned {type(out).__name__}, expected MethodOutput")
    yield Progress("finishing", 0, 1)
    transform, dense = _physical_transform(out, fix.geometry, init_tx, shape)
    warped = warp_image(mov, transform, fix.geometry)
    jac = dense.jacobian()
    return RegistrationResult(
        transform=transform, field=dense, warped=warped,
        jacobian=Image(jac, fix.geometry), fold_fraction=fold_fraction(jac),
        seconds=time.perf_counter() - start, method=method,
        checkpoint=algo.checkpoint_name, io_steps=steps, device=str(dev),
        fixed=fix, moving=mov, output=out, loss=out.loss)


def register(moving: Image | str | Path, fixed: Image | str | Path, method: str = "optimize",
             progress: Callable[[Progress], None] | None = None, **kwargs: Any) -> RegistrationResult:
    """Run :func:`iter_register` to the end; ``progress`` is called with each step."""
    gen = iter_register(moving, fixed, method=method, **kwargs)
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(p)
