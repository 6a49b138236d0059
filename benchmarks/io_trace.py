"""Dice (and folds) along one run of a method, read off its preview maps: how instance optimisation
converges on a benchmark case, in one run instead of one run per step count.

    python -m benchmarks io_trace oasis --method carl --io-steps 100 [--options '{"affine_iterations": 0}']

Each preview map goes through the pipeline's own working->physical conversion, the moving labels
are warped onto the fixed grid as in :func:`benchmarks.peers.run_peer`, and scored by
:func:`benchmarks.tasks.evaluate`. Prints one JSON line per preview; ``--out DIR`` saves them as
``DIR/trace.jsonl`` with the command and code version in ``DIR/results.md`` (``--out`` with no folder:
a new ``benchmarks/results/<date>-io-trace/``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from benchmarks import new_run_dir, provenance, write_run
from benchmarks.tasks import cases, evaluate, load
from napari_register import api, metrics
from napari_register.image import from_sitk
from napari_register.methods.registry import MethodOutput


def trace(case, method: str, io_steps: int, options: dict | None, checkpoint: str | None = None) -> list[dict]:
    pair = load(case)
    mov, fix = from_sitk(pair.moving), from_sitk(pair.fixed)
    init_tx = api.centre_alignment(mov.geometry, fix.geometry)
    gen = api.iter_register(mov, fix, method=method, checkpoint=checkpoint, io_steps=io_steps, device="cpu",
                            options=options)
    rows, t0 = [], time.perf_counter()

    def score(stage: str, step: int, out: MethodOutput, loss: float | None = None) -> dict:
        shape = tuple(out.map.shape[2:])
        _, dense = api._physical_transform(out, fix.geometry, init_tx, shape)
        tx = dense.to_sitk()
        warped = [sitk.GetArrayFromImage(sitk.Resample(lab, pair.fixed, tx, sitk.sitkNearestNeighbor, 0))
                  for lab in pair.moving_labels]
        row = {"case": case.name, "stage": stage, "step": step, "elapsed_s": round(time.perf_counter() - t0, 1),
               "fold_fraction": metrics.fold_fraction(dense.jacobian()), "loss": loss}
        row.update({k: v for k, v in evaluate(pair, warped or None, None).items() if isinstance(v, (int, float))})
        return row

    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        if p.map is not None:
            rows.append(score(p.stage, p.step, MethodOutput(map=p.map), p.loss))
            print(json.dumps(rows[-1]), flush=True)
    rows.append(score("final", io_steps, result.output))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks io_trace", description=__doc__.splitlines()[0])
    ap.add_argument("task")
    ap.add_argument("--method", default="carl")
    ap.add_argument("--io-steps", type=int, default=50)
    ap.add_argument("--options", default=None, help="method options as JSON")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--cases", type=int, nargs="*", help="indices of the task's cases (default all)")
    ap.add_argument("--out", type=Path, nargs="?", const="new", default=None,
                    help="save into this run folder (no folder: a new benchmarks/results/<date>-io-trace/)")
    args = ap.parse_args(argv)
    record = provenance("io_trace", argv)
    options = json.loads(args.options) if args.options else None
    todo = cases(args.task)
    if args.cases:
        todo = [todo[i] for i in args.cases]
    rows = [r for c in todo for r in trace(c, args.method, args.io_steps, options, args.checkpoint)]
    finals = [r for r in rows if r["stage"] == "final"]
    summary = f"mean final dice {float(np.mean([r['dice'] for r in finals]))}"
    print(summary)
    if args.out is not None:
        out = new_run_dir("io-trace") if args.out == "new" else args.out
        write_run(out, record, {"trace": "trace.jsonl"}, summary, title=f"IO trace: {args.task}, {args.method}")
        (out / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
