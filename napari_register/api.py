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

from .coords import Geometry, apply_h, identity_map, resize_image, resize_map, sample
from .errors import ImageError, InputError, ResourceError
from .image import Image, check_registrable, read_image
from .intensity import normalise
from .metrics import fold_fraction
from .methods.registry import Method, MethodOutput, check_options, get_method, list_methods
from .previews import Previewer
from .progress import Cancelled, Progress, Stage, Tracker, seconds_scale
from .resources import plan_run
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
    notes: list[str] = field(default_factory=list)  # what the run changed or noticed (see Progress.message)
    # a homography fitted to a dense result (moving_from_fixed, physical; pixels for photos), to export
    homography: Optional[MatrixTransform] = None
    prealign: Optional[MatrixTransform] = None  # the matrix the run started from (see iter_register)
    # measured seconds of each stage of the run, in order (the estimate's plan: ``Method.plan``)
    timings: list[tuple[str, float]] = field(default_factory=list)
    # the start-against-result check (see ``check_result``): measure, both scores, what was kept
    quality: dict[str, Any] = field(default_factory=dict)

    def warp_labels(self, labels: Image) -> Image:
        """Warp a moving label map (nearest neighbour, label set kept) onto the fixed grid."""
        return warp_image(labels, self.transform, self.fixed.geometry, labels=True)

    @property
    def matrix(self) -> Optional[np.ndarray]:
        """The result as a homogeneous matrix, moving_phys_from_fixed_phys: a homography or affine
        method's transform, else the homography fitted to a dense result; ``None`` for a dense
        result without one. What ``homography.txt``, the plugin's writer and pre-alignment use."""
        m = self.transform.as_matrix()
        return m if m is not None or self.homography is None else self.homography.as_matrix()

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
        raise InputError("device 'cuda' asked for but no CUDA GPU is available; use --device cpu or auto")
    if not isinstance(device, str) or (device not in ("cpu", "cuda") and not device.startswith("cuda:")):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def centre_alignment(moving: Geometry, fixed: Geometry) -> MatrixTransform:
    """Translation that puts the centre of the moving grid on the centre of the fixed grid."""
    return MatrixTransform.translation(moving.center_phys() - fixed.center_phys())


def _as_image(x: Image | str | Path, role: str) -> Image:
    img = x if isinstance(x, Image) else read_image(x)
    check_registrable(img, role)
    return img


def make_method(method: str | Method, dim: int, device: torch.device, checkpoint: str | Path | None,
                 options: dict[str, Any] | None) -> Method:
    """The method instance for ``dim``-D images; every way the name, checkpoint or options can be
    wrong is an :class:`InputError` (a :class:`CheckpointError` for the checkpoint)."""
    if isinstance(method, Method):
        if checkpoint is not None or options:
            raise InputError("pass checkpoint and options when creating the method instance, not with it")
        if method.dim != dim:
            raise InputError(f"the {method.name!r} instance registers {method.dim}D images, these are {dim}D")
        return method
    cls = get_method(method)
    if dim not in cls.dims:
        raise InputError(f"method {method!r} does not register {dim}D images; "
                         f"methods for {dim}D: {', '.join(list_methods(dim))}")
    opts = check_options(cls, options)
    try:
        return cls(dim, device, checkpoint, **opts)
    except InputError:
        raise
    except (TypeError, ValueError) as e:  # an option of the wrong type or out of range
        if not opts:
            raise
        raise InputError(f"options {opts} for method {method!r}: {e}") from None


def _out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's (torch: RuntimeError; numpy: MemoryError)."""
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _overlap_note(moving: Geometry, fixed: Geometry) -> Optional[str]:
    """A note when the two images share no physical space (different scanner frames, or a wrong origin)."""
    boxes = []
    for g in (moving, fixed):
        corners = np.array(np.meshgrid(*[[0, s - 1] for s in g.shape], indexing="ij")).reshape(g.ndim, -1).T
        pts = apply_h(g.phys_from_vox(), corners.astype(np.float64))
        boxes.append((pts.min(0), pts.max(0)))
    (lo_m, hi_m), (lo_f, hi_f) = boxes
    if np.all(lo_m <= hi_f) and np.all(lo_f <= hi_m):
        return None
    gap = float(np.linalg.norm(moving.center_phys() - fixed.center_phys()))
    return (f"the moving and fixed images do not overlap in physical space (centres {gap:.1f} mm apart); "
            "the moving image is centred on the fixed one first - check their headers' origins if they should overlap")


def _working_tensor(image: Image, transform: Transform | None, fixed: Geometry, shape: tuple[int, ...],
                    device: torch.device) -> torch.Tensor:
    """Luminance, normalised, resampled onto the fixed grid (through ``transform``), then to ``shape``."""
    lum = image.with_array(image.luminance(), channels=False, rgb=False)
    if transform is not None:
        lum = warp_image(lum, transform, fixed)
    t = torch.from_numpy(normalise(lum.array))[None, None]
    return resize_image(t, shape).to(device)


def _physical_matrix(matrix: torch.Tensor, fixed: Geometry, shape: tuple[int, ...]) -> np.ndarray:
    """A working-grid norm-frame matrix as fixed phys -> moving phys (centre-aligned moving frame)."""
    work = fixed.with_shape(shape)
    return work.phys_from_norm() @ matrix.detach().double().cpu().numpy() @ work.norm_from_phys()


def _physical_transform(out: MethodOutput, fixed: Geometry, init: MatrixTransform, shape: tuple[int, ...]
                        ) -> tuple[Transform, DisplacementField]:
    """Working-resolution output -> physical ``moving_from_fixed`` transform and its dense field."""
    if out.matrix is not None:
        transform: Transform = Composite([MatrixTransform(_physical_matrix(out.matrix, fixed, shape)), init])
        return transform, transform.to_field(fixed)
    d = fixed.ndim
    phi = resize_map(out.map.detach().float().cpu(), fixed.shape)[0]  # (d, *shape) norm, fixed grid
    ident = identity_map(fixed.shape)[0]
    if not init.is_affine:  # a homography pre-alignment (2D): the perspective divide, in float64
        pts = np.moveaxis(phi.double().numpy(), 0, -1).reshape(-1, d)
        grid = np.moveaxis(ident.double().numpy(), 0, -1).reshape(-1, d)
        p_m = fixed.phys_from_norm()
        moved = apply_h(init.matrix @ p_m, pts) - apply_h(p_m, grid)
        dense = DisplacementField(fixed, moved.reshape(*fixed.shape, d).astype(np.float32))
        return dense, dense
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
                  options: dict[str, Any] | None = None, prealign: MatrixTransform | None = None,
                  ) -> Generator[Progress, None, RegistrationResult]:
    """Register ``moving`` onto ``fixed``; yields :class:`Progress`, returns a :class:`RegistrationResult`.

    The moving image is first centre-aligned onto the fixed image's physical grid, intensities are
    clipped to robust percentiles, both are resized to the method's working grid, and the method's
    map is brought back to the fixed image's native grid in physical units.

    ``cancel``: polled at every progress step; when it returns True, :class:`Cancelled` is raised.
    ``previews``: progress steps that carry a map also carry ``progress.warped`` (the moving image
    warped onto a coarse grid of the fixed image's extent, for live display) while previews stay
    within a small share of the run's time (:mod:`napari_register.previews`). ``init``: a previous
    result on the same pair to continue from (instance optimisation of the current result; its
    ``prealign`` is kept). ``method``: a registered name,
    or a method instance to reuse (its network stays loaded across pairs; ``checkpoint`` and
    ``options`` then belong to it and must be left out). ``prealign``: a moving_from_fixed matrix
    (affine, or a 2D homography, e.g. :func:`homography_first`'s) the moving image is resampled
    through before the method runs, in place of the centre alignment; the result includes it.

    Bad input raises :class:`InputError` (file, option, checkpoint, too little memory) before any heavy
    work. Before allocating, the run's memory is estimated against the device's free memory: when it
    does not fit it moves to the CPU or a coarser working grid, saying so in a ``"note"`` progress
    step (also in ``result.notes``); CUDA running out of memory mid-run falls back to the CPU the same way.
    """
    start = time.perf_counter()
    notes: list[str] = []

    def note(text: str) -> Progress:
        notes.append(text)
        return Progress("note", 0, 0, message=text)

    mov = _as_image(moving, "moving")
    fix = _as_image(fixed, "fixed")
    if mov.ndim != fix.ndim:
        raise ImageError(f"moving image {mov.name} is {mov.ndim}D but fixed image {fix.name} is {fix.ndim}D; "
                         "register 2D with 2D and 3D with 3D")
    dev = resolve_device(device)
    reused = isinstance(method, Method)
    algo = make_method(method, fix.ndim, dev, checkpoint, options)
    dev, cls = algo.device, type(algo)
    method = cls.name
    steps = cls.io_steps_default(dev) if io_steps is None else int(io_steps)
    if steps < 0:
        raise InputError(f"io_steps must be >= 0, got {steps}")
    if prealign is not None and (not isinstance(prealign, MatrixTransform) or prealign.ndim != fix.ndim):
        raise InputError(f"prealign must be a {fix.ndim}D MatrixTransform (moving_from_fixed), got {prealign!r}")
    if init is not None and prealign is None:  # continuing keeps the frame the run started in
        prealign = init.prealign
    init_tx = centre_alignment(mov.geometry, fix.geometry) if prealign is None else prealign
    shape = tuple(algo.working_shape(fix.shape, fix.geometry.spacing))
    init_out = None
    if init is not None:
        if init.output.map.shape[2:] != shape or init.method != method:
            raise InputError("init: the previous result comes from another method or working grid; "
                             "continue only a result of the same method on the same pair")
        init_out = init.output
    else:  # a continued run must keep its grid and device; a fresh one is planned to fit
        plan = plan_run(algo, fix.shape, fix.geometry.spacing, shape, steps, dev, can_move=not reused)
        shape = plan.shape
        if plan.device != dev:
            dev = plan.device
            algo = make_method(method, fix.ndim, dev, checkpoint, options)
        for text in plan.notes:
            yield note(text)
    overlap = _overlap_note(mov.geometry, fix.geometry)
    if overlap:
        yield note(overlap)
    tracker = Tracker(_plan(algo, fix.shape, shape, steps, init is not None),
                      seconds_scale(dev.type, torch.get_num_threads()))
    yield Progress("estimate", 0, 0, eta=tracker.estimate)
    try:
        out = yield from _run_method(algo, mov, fix, init_tx, shape, steps, init_out, dev, cancel, previews,
                                     tracker)
    except Exception as e:
        if not _out_of_memory(e):
            raise
        grid = "x".join(map(str, shape))
        if dev.type == "cpu" or reused or init is not None:
            on_cpu = "" if dev.type == "cpu" else ", or run on the CPU (--device cpu)"
            raise ResourceError(f"{method} ran out of memory on {dev.type.upper()} at a {grid} working grid; "
                                f"close other programs or downsample the images{on_cpu}") from None
        yield note(f"{dev.type.upper()} ran out of memory ({method} at a {grid} working grid); "
                   "running on the CPU instead (slower)")
        del algo
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # give back what the failed attempt held
        dev = torch.device("cpu")
        algo = make_method(method, fix.ndim, dev, checkpoint, options)
        out = yield from _run_method(algo, mov, fix, init_tx, shape, steps, None, dev, cancel, previews, tracker)
    out, (moving_t, fixed_t) = out
    if not isinstance(out, MethodOutput):
        raise TypeError(f"method {method!r} returned {type(out).__name__}, expected MethodOutput")
    out, quality = check_result(out, moving_t, fixed_t)
    if quality["kept"] == "start":
        yield note(f"{method}'s result matched the images worse than its start ({quality['measure']} "
                   f"{quality['result']:.4f} against {quality['start']:.4f}); the start is kept")
    # the full-resolution work takes seconds on a large volume: Cancel is honoured between its parts
    yield tracker.update(Progress("finishing", 0, 1))
    _check_cancel(cancel)
    transform, dense = _physical_transform(out, fix.geometry, init_tx, shape)
    _check_cancel(cancel)
    warped = warp_image(mov, transform, fix.geometry)
    _check_cancel(cancel)
    jac = dense.jacobian()
    homography = None if out.homography is None else MatrixTransform(
        init_tx.matrix @ _physical_matrix(out.homography, fix.geometry, shape))
    yield tracker.update(Progress("done", 1, 1))
    return RegistrationResult(
        transform=transform, field=dense, warped=warped,
        jacobian=Image(jac, fix.geometry), fold_fraction=fold_fraction(jac),
        seconds=time.perf_counter() - start, method=method,
        checkpoint=algo.checkpoint_name, io_steps=steps, device=str(dev),
        fixed=fix, moving=mov, output=out, loss=out.loss, notes=notes, homography=homography,
        prealign=prealign, timings=tracker.timings, quality=quality)


JUDGE_SIZE = 96  # the start-against-result check's grid: longest side (a gross-failure test, cheap)
JUDGE_MARGIN = 1e-3  # relative: a result that only differs from its start by rounding is kept


def check_result(out: MethodOutput, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[MethodOutput, dict[str, Any]]:
    """Keep the start (the identity on the working grid: the centre alignment or the given
    pre-alignment) when the method's result matches the images worse than it, by MIND-SSC (a measure
    no method optimises alone and that holds across modalities) where the fixed image has structure:
    in a flat background MIND's variance floor turns rounding into large descriptor differences.
    Returns the output kept and ``{"measure", "start", "result", "kept"}`` (lower is better)."""
    from .instance_opt import affine_shape
    from .losses import mind_loss, structure

    shape = affine_shape(tuple(fixed.shape[2:]), JUDGE_SIZE)
    mov, fix = resize_image(moving, shape), resize_image(fixed, shape)
    with torch.no_grad():
        phi = resize_map(out.map.detach().to(fix.dtype), shape)
        start = float(mind_loss(mov, fix, where=structure(fix)))
        result = float(mind_loss(sample(mov, phi), fix, where=structure(fix)))
    quality: dict[str, Any] = {"measure": "MIND-SSC", "start": start, "result": result, "kept": "result"}
    if result > start + JUDGE_MARGIN * abs(start):
        quality["kept"] = "start"
        ident = identity_map(tuple(out.map.shape[2:]), out.map.device, out.map.dtype)
        eye = None if out.matrix is None else torch.eye(out.matrix.shape[-1], dtype=out.matrix.dtype,
                                                         device=out.matrix.device)
        hom = None if out.homography is None else torch.eye(out.homography.shape[-1], dtype=out.homography.dtype,
                                                             device=out.homography.device)
        out = MethodOutput(map=ident, matrix=eye, loss=out.loss, homography=hom)
    return out, quality


# seconds per fixed-grid voxel on the reference CPU (2 threads), by dimensionality: resampling both
# images onto the working grid, and bringing the map back (field, warped image, Jacobian); measured
# on the OASIS and histology pairs
PREPARE_SECONDS = {2: 7e-8, 3: 1e-7}
FINISH_SECONDS = {2: 1e-7, 3: 2.5e-7}


def _plan(algo: Method, fixed_shape: tuple[int, ...], shape: tuple[int, ...], steps: int,
          continuing: bool) -> list[Stage]:
    """The whole run's stages: the pipeline's own around the method's (see ``Method.plan``)."""
    voxels, d = float(np.prod(fixed_shape)), len(fixed_shape)
    return ([Stage("preparing", 1, PREPARE_SECONDS[d] * voxels)] + algo.plan(shape, steps, continuing)
            + [Stage("finishing", 1, FINISH_SECONDS[d] * voxels)])


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("registration cancelled")


def _run_method(algo: Method, mov: Image, fix: Image, init_tx: MatrixTransform, shape: tuple[int, ...],
                steps: int, init_out: MethodOutput | None, dev: torch.device,
                cancel: Callable[[], bool] | None, previews: bool, tracker: Tracker) -> Generator[Progress, None, Any]:
    """The method's own loop on the working grid, polling ``cancel`` before every step (so a Cancel
    costs at most the step under way) and adding previews; returns the method's output and the
    working tensors ``(moving, fixed)`` it ran on."""
    fixed_t = _working_tensor(fix, None, fix.geometry, shape, dev)
    moving_t = _working_tensor(mov, init_tx, fix.geometry, shape, dev)
    yield tracker.update(Progress("preparing", 1, 1))  # a step is reported when it is done
    gen = algo.iter_run(moving_t, fixed_t, steps, init=init_out)
    previewer = Previewer(mov, fix, init_tx) if previews else None
    try:
        while True:
            _check_cancel(cancel)
            try:
                progress = next(gen)
            except StopIteration as stop:
                return stop.value, (moving_t, fixed_t)
            if previewer is not None and progress.map is not None and previewer.due():
                progress.warped = previewer(progress.map)
                _check_cancel(cancel)
            yield tracker.update(progress)
    finally:
        gen.close()


def homography_first(result: RegistrationResult) -> MatrixTransform:
    """The matrix of a homography or affine method's result (``result.transform``), or the
    homography fitted to a dense one (``result.homography``, ART), to pass as ``prealign`` to a
    deformable run: "homography first, then deformable"."""
    matrix = result.matrix
    if matrix is None:
        raise InputError(f"{result.method!r} gave a dense field, not a matrix; a pre-alignment needs a "
                         "homography or affine method, e.g. alto or art")
    return MatrixTransform(matrix)


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
