"""Dice (and folds) along one run of a method, read off its preview maps: how instance optimisation
converges on a benchmark case, in one run instead of one run per step count.

    python -m benchmarks.io_trace oasis --method carl --io-steps 100 [--options '{"affine_iterations": 0}']

Each preview map goes through the pipeline's own working->physical conversion, the moving labels
are warped onto the fixed grid as in :func:`benchmarks.peers.run_peer`, and scored by
:func:`benchmarks.tasks.evaluate`. Prints one JSON line per preview; ``--out`` saves them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task")
    ap.add_argument("--method", default="carl")
    ap.add_argument("--io-steps", type=int, default=50)
    ap.add_argument("--options", default=None, help="method options as JSON")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--cases", type=int, nargs="*", help="indices of the task's cases (default all)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    options = json.loads(args.options) if args.options else None
    todo = cases(args.task)
    if args.cases:
        todo = [todo[i] for i in args.cases]
    rows = [r for c in todo for r in trace(c, args.method, args.io_steps, options, args.checkpoint)]
    finals = [r for r in rows if r["stage"] == "final"]
    print("mean final dice", float(np.mean([r["dice"] for r in finals])))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
