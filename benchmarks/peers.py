"""Peer registration methods (ANTs, SimpleITK demons, elastix, OpenCV) behind one interface.

A *runner* takes a loaded :class:`benchmarks.tasks.Pair` and returns a SimpleITK transform that
maps fixed physical points to moving physical points (ITK's direction, the one ``Resample`` uses).
:func:`run_peer` times it, records peak memory, warps the moving labels onto the fixed grid
(nearest neighbour), maps the fixed landmarks and measures folding, identically for every runner.
Our own methods join by adding a runner to ``RUNNERS`` (e.g. one wrapping ``api.register`` and
exporting its field as a ``sitk.DisplacementFieldTransform``).

Run: ``python -m benchmarks peers oasis prostate --peers ants_synonly,elastix_bspline``.
Threads: ``NAPARI_REGISTER_BENCH_THREADS`` (default 2), set before ITK is loaded.
"""
from __future__ import annotations

import os

THREADS = int(os.environ.get("NAPARI_REGISTER_BENCH_THREADS", "2"))
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(THREADS))  # ANTs reads it
os.environ.setdefault("ANTS_RANDOM_SEED", "1")  # repeatable random metric sampling in antsRegistration

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from concurrent.futures.process import BrokenProcessPool  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from benchmarks.tasks import Case, Pair, cases, evaluate, load  # noqa: E402
from napari_register import metrics  # noqa: E402

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
Runner = Callable[[Pair], sitk.Transform]


@dataclass(frozen=True)
class Peer:
    """A runner and the problems it is meant for (``dims``; ``mono``/``multi`` modality)."""

    run: Runner
    dims: tuple[int, ...] = (2, 3)
    modalities: tuple[str, ...] = ("mono", "multi")
    label: str = ""
    warm: Optional[Callable[[], Any]] = None  # imports/loads the library so neither time nor memory counts it

    def applies(self, case: Case) -> bool:
        return case.dim in self.dims and ("multi" if case.multimodal else "mono") in self.modalities


# ---------------------------------------------------------------------------------------- ANTs

def _to_ants(img: sitk.Image) -> Any:
    import ants
    d = img.GetDimension()
    # ANTs arrays are indexed (x, y[, z]): the transpose of SimpleITK's.
    return ants.from_numpy(np.ascontiguousarray(sitk.GetArrayFromImage(img).T.astype(np.float32)),
                           origin=img.GetOrigin(), spacing=img.GetSpacing(),
                           direction=np.reshape(img.GetDirection(), (d, d)))


def _ants_transform(files: list[str], dim: int) -> sitk.Transform:
    """ANTs ``fwdtransforms`` ([warp, affine]) -> one SimpleITK transform, fixed -> moving.

    A fixed point goes through the warp first, then the affine. ``CompositeTransform`` applies
    its last-added transform first, so the files are added in reverse (checked against ANTs'
    own ``warpedmovout``: mean difference 2e-5 of 73)."""
    comp = sitk.CompositeTransform(dim)
    for f in reversed(files):
        if f.endswith((".nii.gz", ".nii")):
            field = sitk.ReadImage(f, sitk.sitkVectorFloat64)
            comp.AddTransform(sitk.DisplacementFieldTransform(field))
        else:
            comp.AddTransform(sitk.ReadTransform(f))
    return comp


def _ants(type_of_transform: str) -> Runner:
    def run(pair: Pair) -> sitk.Transform:
        import ants
        tmp = tempfile.mkdtemp(prefix="bench_ants_")
        try:
            # Mattes for both stages is antspy's default; spelled out because the multimodal tasks
            # rely on it (the antsRegistrationSyNQuick[...] types use their own MI metric).
            reg = ants.registration(_to_ants(pair.fixed), _to_ants(pair.moving), type_of_transform,
                                    aff_metric="mattes", syn_metric="mattes",
                                    outprefix=os.path.join(tmp, "x"))
            return _ants_transform(reg["fwdtransforms"], pair.fixed.GetDimension())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return run


# ------------------------------------------------------------------------------ SimpleITK demons

def _shrink(img: sitk.Image, factor: int, sigma_vox: float) -> sitk.Image:
    """Gaussian-smooth (sigma in voxels) then resample to ``size / factor``, same extent."""
    if sigma_vox > 0:
        img = sitk.SmoothingRecursiveGaussian(img, [sigma_vox * s for s in img.GetSpacing()])
    if factor == 1:
        return img
    size = [max(int(s / factor + 0.5), 2) for s in img.GetSize()]
    spacing = [(s0 - 1) * sp / (s1 - 1) for s0, s1, sp in zip(img.GetSize(), size, img.GetSpacing())]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                         img.GetDirection(), 0.0, img.GetPixelID())


def _demons(pair: Pair, shrinks=(4, 2, 1), sigmas=(2, 1, 0), iterations=(100, 100, 50),
            field_sigma: float = 1.5) -> sitk.Transform:
    """Multi-resolution fast symmetric forces demons on z-scored images (SimpleITK notebook 66)."""
    fixed = sitk.Normalize(pair.fixed)
    # Demons compares voxel by voxel: bring the moving image onto the fixed grid first.
    moving = sitk.Normalize(sitk.Resample(pair.moving, pair.fixed, sitk.Transform(), sitk.sitkLinear, 0.0))
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(field_sigma)  # voxels of the current level
    demons.SetSmoothUpdateField(False)
    field = None
    for factor, sigma, iters in zip(shrinks, sigmas, iterations):
        f, m = _shrink(fixed, factor, sigma), _shrink(moving, factor, sigma)
        if field is None:
            field = sitk.Image(f.GetSize(), sitk.sitkVectorFloat64, f.GetDimension())
            field.CopyInformation(f)
        else:
            field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        demons.SetNumberOfIterations(iters)
        field = demons.Execute(f, m, field)
    return sitk.DisplacementFieldTransform(field)


# --------------------------------------------------------------------------------------- elastix

def _to_itk(img: sitk.Image) -> Any:
    import itk
    out = itk.image_from_array(sitk.GetArrayFromImage(img).astype(np.float32))
    out.SetOrigin(img.GetOrigin())
    out.SetSpacing(img.GetSpacing())
    d = img.GetDimension()
    out.SetDirection(itk.matrix_from_array(np.reshape(img.GetDirection(), (d, d)).astype(np.float64)))
    return out


def _elastix(maps: tuple[str, ...]) -> Runner:
    """elastix with its default parameter maps, run in sequence (e.g. affine then bspline)."""
    def run(pair: Pair) -> sitk.Transform:
        import itk
        params = itk.ParameterObject.New()
        for m in maps:
            params.AddParameterMap(params.GetDefaultParameterMap(m))
        moving = _to_itk(pair.moving)
        # No number_of_threads= here: with it itk-elastix 0.25.4 segfaults in the B-spline stage;
        # the thread count comes from ITK's global default (set at import of this module).
        _, result = itk.elastix_registration_method(_to_itk(pair.fixed), moving, parameter_object=params,
                                                    log_to_console=False)
        # transformix's deformation field: on the fixed grid, fixed -> moving, physical units.
        # It also writes deformationField.nii into its output directory: keep that out of the cwd.
        with tempfile.TemporaryDirectory(prefix="bench_transformix_") as tmp:
            disp = itk.array_from_image(itk.transformix_deformation_field(moving, result, output_directory=tmp))
        field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
        field.CopyInformation(pair.fixed)
        return sitk.DisplacementFieldTransform(field)
    return run


# ------------------------------------------------------------------------------- OpenCV SIFT

def _sift_homography(pair: Pair, ratio: float = 0.75, ransac_px: float = 3.0,
                     min_inliers: int = 10) -> sitk.Transform:
    """SIFT matches (Lowe ratio test) + RANSAC homography, fixed -> moving physical (x, y).

    Fewer than ``min_inliers`` RANSAC inliers is a failure: such a homography is a guess."""
    import cv2
    cv2.setNumThreads(THREADS)

    def features(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
        a = sitk.GetArrayFromImage(img)
        u8 = np.uint8(np.clip(255 * (a - a.min()) / max(np.ptp(a), 1e-6), 0, 255))
        kps, desc = cv2.SIFT_create().detectAndCompute(u8, None)
        # keypoint pt is (column, row) = continuous index (x, y) -> physical
        pts = np.array([img.TransformContinuousIndexToPhysicalPoint(k.pt) for k in kps])
        return pts, desc

    pf, df = features(pair.fixed)
    pm, dm = features(pair.moving)
    matches = [m for m, n in cv2.BFMatcher().knnMatch(df, dm, k=2) if m.distance < ratio * n.distance]
    if len(matches) < 4:
        raise RuntimeError(f"SIFT found {len(matches)} matches (< 4), no homography")
    src = pf[[m.queryIdx for m in matches]].astype(np.float32)
    dst = pm[[m.trainIdx for m in matches]].astype(np.float32)
    H, inliers = cv2.findHomography(src, dst, cv2.RANSAC, ransac_px * pair.fixed.GetSpacing()[0])
    n_in = 0 if H is None else int(inliers.sum())
    if n_in < min_inliers:
        raise RuntimeError(f"SIFT+RANSAC: {n_in} inliers of {len(matches)} matches (< {min_inliers})")
    return _field_from_points_map(pair.fixed, lambda p: _apply_h(H, p))


def _apply_h(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    h = np.c_[pts, np.ones(len(pts))] @ H.T
    return h[:, :2] / h[:, 2:]


def _field_from_points_map(fixed: sitk.Image, fn: Callable[[np.ndarray], np.ndarray]) -> sitk.Transform:
    """Sample a fixed -> moving point map on the fixed grid into a displacement field transform."""
    pts = _grid_points(fixed)
    disp = (fn(pts.reshape(-1, pts.shape[-1])) - pts.reshape(-1, pts.shape[-1])).reshape(pts.shape)
    field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field.CopyInformation(fixed)
    return sitk.DisplacementFieldTransform(field)


def _grid_points(img: sitk.Image) -> np.ndarray:
    """Physical (x, y[, z]) of every voxel centre, array shape ``(*array_shape, d)``."""
    d = img.GetDimension()
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in img.GetSize()[::-1]], indexing="ij"), -1)[..., ::-1]
    m = np.reshape(img.GetDirection(), (d, d)) @ np.diag(img.GetSpacing())
    return idx @ m.T + np.asarray(img.GetOrigin())


# ----------------------------------------------------------------------------- shared measuring

def jacobian_determinant(tx: sitk.Transform, fixed: sitk.Image) -> np.ndarray:
    """det of d(moving point)/d(fixed point) on the fixed grid (array order); <= 0 means folding.

    Computed here rather than with ``DisplacementFieldJacobianDeterminant``, which ignores the
    direction matrix (the OASIS and prostate grids are flipped in x and y)."""
    d = fixed.GetDimension()
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    u = sitk.GetArrayViewFromImage(field)  # (*array_shape, d), vectors in (x, y[, z])
    m = np.reshape(fixed.GetDirection(), (d, d)) @ np.diag(fixed.GetSpacing())  # phys per index (x, y, z)
    # d(phi)/d(index_xyz) = M + du/d(index_xyz); array axis a is index axis d-1-a
    grads = [np.gradient(u, axis=a).astype(np.float32) for a in range(d)][::-1]
    jac = np.stack(grads, -1) + m.astype(np.float32)
    return np.linalg.det(jac) / np.linalg.det(m)


def _status_kb(field: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _give_back_freed_memory() -> None:
    """Garbage, and what malloc keeps of memory freed by earlier runs, back to the system, so that a
    run reusing it grows the resident set (and is counted) instead of hiding in it."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc
    except (AttributeError, OSError):
        pass


class _PeakRSS:
    """Peak resident memory this process adds while the block runs: ``mb`` = the kernel's high-water
    mark of the resident set (``VmHWM``) at the end minus the resident set at the start.

    Exact, not sampled: the mark is reset to the current resident set at the start by writing ``5``
    to ``/proc/self/clear_refs`` (Linux >= 4.0), after :func:`_give_back_freed_memory`. (The former
    20 ms sampler of RSS growth read 0 MB for most runs: an earlier run's freed memory was reused.)
    ``mb`` is None where the reset is not available (not Linux)."""

    def __enter__(self) -> "_PeakRSS":
        _give_back_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start: Optional[int] = _status_kb("VmHWM")  # = the resident set at the reset
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = _status_kb("VmHWM") if self.start is not None else None

    @property
    def mb(self) -> Optional[float]:
        return None if self.start is None or self.peak is None else (self.peak - self.start) / 1024


def _warm_ants() -> None:
    import ants  # noqa: F401


def _warm_elastix() -> None:
    import itk
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(THREADS)
    itk.ParameterObject.New()  # itk loads its modules lazily, elastix's on first use
    itk.elastix_registration_method  # noqa: B018


def _warm_cv2() -> None:
    import cv2  # noqa: F401


RUNNERS: dict[str, Peer] = {
    "identity": Peer(lambda pair: sitk.Transform(pair.fixed.GetDimension(), sitk.sitkIdentity),
                     label="unregistered (physical space)"),
    "ants_synonly": Peer(_ants("SyNOnly"), (3,), ("mono",), "ANTs SyNOnly", _warm_ants),
    "ants_syn": Peer(_ants("SyN"), label="ANTs SyN (Mattes)", warm=_warm_ants),
    "ants_synquick": Peer(_ants("antsRegistrationSyNQuick[s]"), (3,), ("mono",), "ANTs SyNQuick", _warm_ants),
    "sitk_demons": Peer(_demons, (3,), ("mono",), "SimpleITK fast symmetric demons"),
    "elastix_bspline": Peer(_elastix(("bspline",)), (3,), ("mono",), "elastix B-spline", _warm_elastix),
    "elastix_affine_bspline": Peer(_elastix(("affine", "bspline")), modalities=("multi",),
                                   label="elastix affine+B-spline (MI)", warm=_warm_elastix),
    "opencv_sift": Peer(_sift_homography, (2,), label="OpenCV SIFT+RANSAC homography", warm=_warm_cv2),
}


def peers_for(case: Case) -> list[str]:
    """Names of the runners meant for this case, ``identity`` first."""
    return [n for n, p in RUNNERS.items() if p.applies(case)]


def run_peer(name: str, case: Case | Pair, isolate: bool = False) -> dict[str, Any]:
    """Register one case with one runner and score it.

    Returns ``peer``, ``case``, ``seconds`` (registration only), ``peak_mem_mb`` (the most resident
    memory the registration adds over what the process held before it, see :class:`_PeakRSS`),
    ``fold_fraction``, ``warped_labels`` (arrays on the fixed grid), ``mapped_points`` (fixed
    landmarks mapped to moving, ``(N, d)`` physical), ``transform`` and the scores of
    :func:`benchmarks.tasks.evaluate`; on failure ``error`` holds the message instead.
    ``isolate``: run in a fresh (spawned) process, without ``transform`` in the result, so that a
    crash in a peer's C++ ends one case, not the run; only for runners defined at import of this
    module (one added to ``RUNNERS`` at run time does not exist in the child)."""
    if name not in RUNNERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(RUNNERS)}")
    if isolate:
        # An executor, not a Pool: a worker killed by a crash in C++ raises here instead of hanging.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            try:
                return ex.submit(_run_isolated, name, case).result()
            except BrokenProcessPool as e:
                c = case.case if isinstance(case, Pair) else case
                return {"peer": name, "case": c.name, "task": c.task, "error": f"worker process died: {e}"}
    peer = RUNNERS[name]
    pair = case if isinstance(case, Pair) else load(case)
    out: dict[str, Any] = {"peer": name, "case": pair.case.name, "task": pair.case.task}
    if peer.warm is not None:
        peer.warm()
    try:
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            tx = peer.run(pair)
            out["seconds"] = time.perf_counter() - t0
    except RuntimeError as e:  # a peer that fails on a case is a result, not a crash
        out["error"] = str(e)
        return out
    if mem.mb is not None:
        out["peak_mem_mb"] = mem.mb
    out["transform"] = tx
    out["warped_labels"] = [sitk.GetArrayFromImage(sitk.Resample(lab, pair.fixed, tx, sitk.sitkNearestNeighbor, 0))
                            for lab in pair.moving_labels]
    if pair.fixed_points is not None:
        out["mapped_points"] = np.array([tx.TransformPoint(tuple(map(float, p))) for p in pair.fixed_points])
    if name != "identity":
        out["fold_fraction"] = metrics.fold_fraction(jacobian_determinant(tx, pair.fixed))
    out.update(evaluate(pair, out["warped_labels"] or None, out.get("mapped_points")))
    return out


def _run_isolated(name: str, case: Case | Pair) -> dict[str, Any]:
    out = run_peer(name, case)
    out.pop("transform", None)  # can be a large field; the scores and warped labels are what return
    return out


# ------------------------------------------------------------------------------------ the table

def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over the cases of each (task, peer); failures are counted, not averaged."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["peer"]), []).append(r)
    out = []
    for (task, peer), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        s: dict[str, Any] = {"task": task, "peer": peer, "cases": len(rs), "failed": len(rs) - len(ok)}
        for k in ("dice", "dice_small", "tre", "mace", "seconds", "peak_mem_mb", "fold_fraction"):
            vals = [r[k] for r in ok if k in r]
            if vals:
                s[k] = float(np.nanmean(vals))
        out.append(s)
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`summarise` output."""
    lines = ["| task | method | cases (failed) | Dice | TRE | s/case | peak MB | folds % |",
             "|---|---|---|---|---|---|---|---|"]

    def f(s: dict[str, Any], k: str, fmt: str, scale: float = 1.0) -> str:
        return format(s[k] * scale, fmt) if k in s else "-"
    for s in summary:
        lines.append(f"| {s['task']} | {RUNNERS[s['peer']].label or s['peer']} | {s['cases']} ({s['failed']}) | "
                     f"{f(s, 'dice', '.3f')} | {f(s, 'tre', '.1f')} | {f(s, 'seconds', '.1f')} | "
                     f"{f(s, 'peak_mem_mb', '.0f')} | {f(s, 'fold_fraction', '.3f', 100)} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks peers",
                                 description="Run the peer registration methods on the benchmark tasks")
    ap.add_argument("tasks", nargs="+", help="oasis prostate mr_us histology")
    ap.add_argument("--peers", default="", help="comma-separated runner names (default: all that apply)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every peer in this process (faster; a peer that crashes ends the run)")
    args = ap.parse_args(argv)
    rows = []
    for task in args.tasks:
        for case in cases(task):
            pair = load(case)
            for name in (args.peers.split(",") if args.peers else peers_for(case)):
                if not RUNNERS[name].applies(case):
                    continue
                r = run_peer(name, pair, isolate=not args.in_process)
                rows.append(r)
                scores = {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}
                print(case.name, name, r.get("error", scores), flush=True)
    print(format_table(summarise(rows)))


if __name__ == "__main__":
    main()
