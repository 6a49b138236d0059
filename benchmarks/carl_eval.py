"""CARL and CARL + instance optimisation on the benchmark tasks, scored by the shared harness.

Each variant is a runner (``api.register`` -> SimpleITK displacement field) added to
:data:`benchmarks.peers.RUNNERS`, so Dice, TRE, folds and wall time are measured exactly as for
the classical peers. Writes ``results.json`` and ``results.md`` into a new run folder
``benchmarks/results/<date>-carl-eval/`` (``--out`` to choose another) and prints the summary table.

    python -m benchmarks carl_eval oasis prostate --io-steps 0 50 [--peers sitk_demons]
    python -m benchmarks carl_eval --timing        # network and IO seconds on the OASIS pair
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from benchmarks import new_run_dir, peers, provenance, write_run
from benchmarks.tasks import cases
from napari_register.api import register
from napari_register.data import data_root


def carl_runner(io_steps: int, checkpoint: str | None) -> peers.Peer:
    def run(pair: Any):
        res = register(str(pair.case.moving), str(pair.case.fixed), method="carl", checkpoint=checkpoint,
                       io_steps=io_steps, device="cpu")
        return res.field.to_sitk()

    label = "CARL" + (f" + IO {io_steps}" if io_steps else "")
    return peers.Peer(run=run, dims=(3,), modalities=("mono",), label=label)


def timing(checkpoint: str | None, io_steps: int, threads: int) -> dict[str, float]:
    """Wall time of CARL's network pass and of its instance optimisation on the OASIS pair,
    read off the progress stream of ``iter_register`` (pipeline overhead excluded)."""
    import time

    import torch

    from napari_register.api import iter_register

    torch.set_num_threads(threads)
    d = data_root() / "brain3d" / "oasis_pair"
    gen = iter_register(d / "image_A_160x192x144.nii.gz", d / "image_B_160x192x144.nii.gz", method="carl",
                        checkpoint=checkpoint, io_steps=io_steps, device="cpu")
    stamps: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        while True:
            p = next(gen)
            stamps.setdefault(p.stage, time.perf_counter() - t0)
            stamps[p.stage + "_end"] = time.perf_counter() - t0
    except StopIteration as stop:
        result = stop.value
    out = {"threads": threads, "io_steps": io_steps, "total_s": time.perf_counter() - t0,
           "network_s": stamps["network"] - stamps["preparing"],
           "working_shape": list(result.output.map.shape[2:])}
    if io_steps:
        out["io_s"] = stamps["instance optimisation_end"] - stamps["network"]
        out["io_s_per_step"] = out["io_s"] / io_steps
    return out


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks carl_eval", description=__doc__.splitlines()[0])
    p.add_argument("tasks", nargs="*", default=["oasis"], help="benchmark tasks, e.g. oasis prostate")
    p.add_argument("--io-steps", type=int, nargs="+", default=[0, 50])
    p.add_argument("--checkpoint", help="CARL checkpoint (default: the shipped one)")
    p.add_argument("--peers", default="", help="comma-separated classical peers to run in the same process")
    p.add_argument("--out", type=Path, help="run folder (default: a new benchmarks/results/<date>-carl-eval/)")
    p.add_argument("--timing", action="store_true", help="only time the network and IO on the OASIS pair")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.timing:
        print(json.dumps(timing(args.checkpoint, max(args.io_steps), args.threads)))
        return
    record = provenance("carl_eval", argv)
    names = []
    for steps in args.io_steps:
        name = f"carl_io{steps}"
        peers.RUNNERS[name] = carl_runner(steps, args.checkpoint)
        names.append(name)
    names += [n for n in args.peers.split(",") if n]
    rows = []
    for task in args.tasks:
        for case in cases(task):
            for name in names:
                row = peers.run_peer(name, case)
                row = {k: v for k, v in row.items() if k not in ("transform", "warped_labels", "mapped_points")}
                rows.append(row)
                print(row, flush=True)
    summary = peers.summarise(rows)
    out = args.out or new_run_dir("carl-eval")
    print(write_run(out, record, {"rows": rows, "summary": summary}, peers.format_table(summary),
                    title="CARL and CARL + IO"))


if __name__ == "__main__":
    main()
