"""Soak: many registrations back to back in one process, through the API every front end uses.

Prints the process's resident memory (RSS) and its thread count at the start, after a warm-up and
at the end, and fails (exit 1) when memory keeps growing or threads are left behind. Each run gets
fresh arrays, so a leak in the pipeline (a cached tensor, a preview kept alive, a thread per run)
adds up over the runs.

``python -m benchmarks soak [--runs 50] [--method optimize] [--dim 3] [--size 48]``
"""
from __future__ import annotations

import argparse
import gc
import threading
import time
from typing import Optional

import numpy as np

# Growth allowed between the warm-up and the end: allocator noise, not one pair's worth per run.
MAX_GROWTH_MB = 50.0


def _pair(dim: int, size: int, seed: int):
    from scipy.ndimage import gaussian_filter

    from napari_register.coords import Geometry
    from napari_register.image import Image

    rng = np.random.default_rng(seed)
    shape = (size,) * dim
    fixed = gaussian_filter(rng.random(shape), 2).astype(np.float32)
    moving = np.roll(fixed, 2, axis=0)
    g = Geometry.default(shape)
    return Image(moving, g), Image(fixed, g)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="runs before the reference measurement")
    p.add_argument("--method", default="optimize")
    p.add_argument("--dim", type=int, default=3, choices=[2, 3])
    p.add_argument("--size", type=int, default=48, help="image side in voxels")
    p.add_argument("--io-steps", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a busy 2-core machine runs 2 threads 20x slower)")
    args = p.parse_args(argv)

    import torch

    from napari_register import register

    torch.set_num_threads(args.threads)

    options = {"optimize": {"levels": [2, 1], "iterations": [10, 5]}}.get(args.method)
    start_rss, start_threads = _rss_mb(), threading.active_count()
    print(f"start:   RSS {start_rss:8.1f} MB, threads {start_threads}")
    ref_rss, t0 = start_rss, time.perf_counter()
    for i in range(args.runs):
        moving, fixed = _pair(args.dim, args.size, i)
        result = register(moving, fixed, method=args.method, options=options, io_steps=args.io_steps,
                          device=args.device)
        del result, moving, fixed
        gc.collect()
        if i + 1 == args.warmup:
            ref_rss = _rss_mb()
            print(f"warm-up: RSS {ref_rss:8.1f} MB after {args.warmup} runs")
    end_rss, end_threads = _rss_mb(), threading.active_count()
    seconds = time.perf_counter() - t0
    print(f"end:     RSS {end_rss:8.1f} MB, threads {end_threads}, {args.runs} runs in {seconds:.1f} s")
    growth = end_rss - ref_rss
    ok = growth <= MAX_GROWTH_MB and end_threads <= start_threads
    print(f"{'flat' if ok else 'LEAK'}: RSS {growth:+.1f} MB since the warm-up (limit {MAX_GROWTH_MB:.0f}), "
          f"threads {end_threads - start_threads:+d}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
