"""Cohort throughput: pairs per minute with 1 and 2 Dask workers against a plain loop, on the prostate
MR pairs, with the engine's overhead and each worker's peak memory.

    python -m benchmarks batch [--method optimize] [--repeat 2] [--out DIR]

Every figure is the whole job as a user waits for it: the loop is ``register_to_folder`` pair after
pair in this process (torch's threads = the cores); the engine is ``register_many`` on a fresh
``LocalCluster`` (start-up and shut-down included; the same job without them is given too), each
worker with cores / workers torch threads.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks import new_run_dir, provenance, write_run
from benchmarks.tasks import cases
from napari_register.data import skip_reason


def _pairs(repeat: int) -> list[dict[str, Any]]:
    out = []
    for k in range(repeat):
        for case in cases("prostate"):
            out.append({"moving": str(case.moving), "fixed": str(case.fixed), "moving_labels": str(case.moving_labels),
                        "fixed_labels": str(case.fixed_labels), "name": f"{case.name}_{k}"})
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks batch", description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="optimize")
    ap.add_argument("--repeat", type=int, default=2, help="each of the 5 pairs this many times")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the table gives each arm's best")
    ap.add_argument("--out", help="run folder (default: a new benchmarks/results/<date>-batch)")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        raise SystemExit(reason)
    import torch
    from distributed import Client, LocalCluster

    from napari_register.batch import register_many
    from napari_register.outputs import PairFiles, register_to_folder

    record = provenance("batch", argv)
    out = Path(args.out) if args.out else new_run_dir("batch")
    scratch = Path(tempfile.mkdtemp(prefix="napari-register-batch-"))  # the outputs themselves are not kept
    pairs = _pairs(args.repeat)
    cores = os.cpu_count() or 1
    rows = []

    def loop(folder: Path) -> dict[str, float]:
        torch.set_num_threads(cores)
        t0 = time.perf_counter()
        for p in pairs:
            register_to_folder(PairFiles(**{k: v for k, v in p.items() if k != "name"}), folder / p["name"],
                               method=args.method)
        s = time.perf_counter() - t0
        return {"seconds": s, "seconds_without_startup": s, "peak_mb_per_worker": _peak_rss_mb(), "failed": 0}

    def engine(folder: Path, workers: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          memory_limit=None) as cluster, Client(cluster) as client:
            t1 = time.perf_counter()
            table = register_many(pairs, folder, method=args.method, client=client, workers=workers,
                                  torch_threads=max(1, cores // workers))
            t2 = time.perf_counter()
            peaks = client.run(_peak_rss_mb)
        return {"seconds": time.perf_counter() - t0, "seconds_without_startup": t2 - t1,
                "peak_mb_per_worker": max(peaks.values()), "failed": int((table["status"] == "failed").sum())}

    arms = [("plain loop (1 process)", 1, cores, lambda f: loop(f)),
            ("Dask LocalCluster, 1 worker", 1, cores, lambda f: engine(f, 1)),
            ("Dask LocalCluster, 2 workers", 2, max(1, cores // 2), lambda f: engine(f, 2))]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in arms}
    for r in range(args.rounds):  # interleaved, so a load on the machine falls on every arm alike
        for i, (name, _, _, fn) in enumerate(arms):
            runs[name].append(fn(scratch / f"round{r}" / f"arm{i}"))
    for name, workers, threads, _ in arms:
        best = min(runs[name], key=lambda m: m["seconds"])
        rows.append({"engine": name, "workers": workers, "torch_threads": threads, **best,
                     "all_seconds": [m["seconds"] for m in runs[name]]})
    loop_s = rows[0]["seconds"]
    for r in rows:
        r["pairs_per_minute"] = 60 * len(pairs) / r["seconds"]
        r["overhead_vs_loop"] = r["seconds"] / loop_s - 1
    lines = [f"{len(pairs)} prostate MR pairs ({args.repeat} x the benchmark's 5), method `{args.method}`, "
             f"{cores} cores; best of {args.rounds} interleaved rounds (all: results.json).", "",
             "| engine | torch threads / worker | seconds (whole job) | pairs / min | overhead vs loop | "
             "seconds without cluster start | peak MB / worker |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['torch_threads']} | {r['seconds']:.1f} | {r['pairs_per_minute']:.1f} | "
                     f"{100 * r['overhead_vs_loop']:+.1f} % | {r['seconds_without_startup']:.1f} | "
                     f"{r['peak_mb_per_worker']:.0f} |")
    shutil.rmtree(scratch, ignore_errors=True)
    text = write_run(out, record, {"pairs": len(pairs), "method": args.method, "rows": rows}, "\n".join(lines),
                     title="Cohort registration: Dask engine against a plain loop")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
