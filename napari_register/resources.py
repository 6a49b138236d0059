"""What the machine has: free memory per device, and the size limit a file must pass before it is read.

Kept apart (and torch-free at import) so the readers can refuse a huge header before allocating.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ImageError, ResourceError

# A file is refused when its voxels alone would take more than this share of the free RAM: reading it
# is only the start (the run makes float copies, fields and warps of it).
READ_SHARE = 0.5


def cpu_available() -> int:
    """Bytes of RAM free for a new allocation (psutil's ``available``)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a dependency; this keeps a stripped install working
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def available(device: Any) -> int:
    """Bytes free on ``device`` (a ``torch.device`` or its name): CUDA's free memory, else the RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return cpu_available()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable; keeps type checkers quiet


def check_file_size(path: Any, shape: Sequence[int], itemsize: int) -> None:
    """Raise :class:`ImageError` when a header declares more voxels than this machine can hold,
    before any of them is read (a damaged header can declare petabytes)."""
    if any(int(s) < 0 for s in shape):
        raise ImageError(f"{path}: the header declares a negative size {tuple(shape)}; the file is damaged")
    need = math.prod(int(s) for s in shape) * max(int(itemsize), 1)
    limit = READ_SHARE * cpu_available()
    if need > limit:
        raise ImageError(f"{path}: the header declares {'x'.join(str(int(s)) for s in shape)} voxels "
                         f"({fmt_bytes(need)}), more than this machine can hold ({fmt_bytes(limit)} usable of "
                         f"{fmt_bytes(cpu_available())} free); if the size is real, crop or downsample the image "
                         "first, otherwise the header is damaged")


# What the pipeline holds per voxel of the fixed grid, measured (CPU peaks, 2D and 3D): while the
# method runs (both images and their float copies) and while it finishes (the dense field, its
# Jacobian, the warped image, float64 voxel positions): ~200 B; plus the libraries' own working set.
HOLD_BYTES, OUTPUT_BYTES, OVERHEAD = 40, 220, 150_000_000
CUDA_OVERHEAD = 300_000_000  # CUDA context and cuDNN workspaces
SHRINK = 0.8  # each lower-resolution try scales the image's grid by this


@dataclass
class Plan:
    """Where and at which working grid a run fits, and what to tell the user about it."""

    shape: tuple[int, ...]
    device: Any
    notes: list[str]


def plan_run(method: Any, fixed_shape: Sequence[int], spacing_xyz: Sequence[float], shape: tuple[int, ...],
             io_steps: int, device: Any, can_move: bool = True) -> Plan:
    """Check, before allocating, that a run of ``method`` (a Method: ``working_shape``,
    ``memory_bytes``, ``name``) fits the memory free on ``device``.

    If it does not: the CPU when CUDA is short and ``can_move``, else a coarser working grid, each
    with a note; or :class:`ResourceError` with the numbers when even the coarsest grid cannot fit."""
    import torch

    device = torch.device(device)
    cpu = torch.device("cpu")
    voxels = math.prod(int(n) for n in fixed_shape)
    grid = (lambda s: "x".join(map(str, s)))
    host_need = OVERHEAD + OUTPUT_BYTES * voxels
    if host_need > available(cpu):
        raise ResourceError(f"the fixed image ({grid(fixed_shape)} voxels) needs ~{fmt_bytes(host_need)} of RAM for "
                            f"its full-resolution outputs, but only {fmt_bytes(available(cpu))} are free; close other "
                            "programs, or crop or downsample the fixed image")

    def need(dev: Any, s: tuple[int, ...]) -> int:
        m = method.memory_bytes(tuple(s), io_steps)
        if dev.type == "cuda":
            return int(m + CUDA_OVERHEAD)
        return int(OVERHEAD + max(m + HOLD_BYTES * voxels, OUTPUT_BYTES * voxels))

    if need(device, shape) <= available(device):
        return Plan(tuple(shape), device, [])
    what = (lambda dev, s: f"{method.name} at a {grid(s)} working grid needs ~{fmt_bytes(need(dev, s))} on "
            f"{dev.type.upper()}, which has {fmt_bytes(available(dev))} free")
    if device.type != "cpu" and can_move and need(cpu, shape) <= available(cpu):
        return Plan(tuple(shape), cpu, [f"{what(device, shape)}; running on the CPU instead (slower)"])
    f, s = 1.0, tuple(shape)
    while f > 0.01:
        f *= SHRINK
        smaller = tuple(max(int(round(n * f)), 2) for n in fixed_shape)
        s = tuple(method.working_shape(smaller, tuple(x / f for x in spacing_xyz)))
        if need(device, s) <= available(device):
            return Plan(s, device, [f"{what(device, shape)}; working at {grid(s)} instead "
                                    f"(~{fmt_bytes(need(device, s))}): the result is coarser"])
        if max(s) <= 8:
            break
    raise ResourceError(f"{what(device, shape)}; even at {grid(s)} it needs ~{fmt_bytes(need(device, s))}. Close "
                        "other programs, crop or downsample the images, or use a machine with more memory")
