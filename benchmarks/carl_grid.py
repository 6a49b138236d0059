"""Does a CARL network trained on a small grid gain from running on a larger one?

Attention and convolutions do not depend on the grid size, so a checkpoint trained at one size runs
at any. This sweeps Xi's token budget (the ``tokens`` option, which sets the working grid: Xi runs at
a quarter of it) and scores each size through the shared harness, with the affine stage (the
default pipeline) and without IO. The 3D list starts at the training grid's token count (12x14x12);
the 2D one holds the training grid (40^2) and one coarser grid.

    python -m benchmarks carl_grid --tasks oasis prostate --tokens3d 2016 4096 8000 13824
    python -m benchmarks carl_grid --tasks histology photos --tokens2d 1024 1600 2304 4096

Writes ``results.json`` and ``results.md`` into a new run folder ``benchmarks/results/<date>-carl-grid/``
(``--out`` to choose another).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks import new_run_dir, peers, provenance, write_run
from benchmarks.run import METRIC, ours
from benchmarks.tasks import cases, load


def _pairs(task: str):
    """``(task label, dim, pair, score)`` for each case; ``score(row)`` adds photo MACE."""
    if task == "photos":
        from benchmarks import photos
        from benchmarks.run import _photo_pair, _score_photo

        for variant in ("clean", "degraded"):
            for pc in photos.cases(variant):
                yield f"photos_{variant}", 2, _photo_pair(pc), (lambda row, pc=pc: _score_photo(row, pc))
        return
    for case in cases(task):
        yield task, case.dim, load(case), (lambda row: None)


def sweep(tasks: list[str], tokens: dict[int, list[int]], checkpoint: str | None = None) -> list[dict]:
    rows = []
    for task in tasks:
        for label, dim, pair, score in _pairs(task):
            for n in tokens[dim]:
                name = f"carl_tokens{n}"
                peers.RUNNERS[name] = ours("carl", options={"tokens": n}, label=f"CARL, {n} tokens",
                                             checkpoint=checkpoint)
                row = peers.run_peer(name, pair)
                score(row)
                row = {k: v for k, v in row.items() if k not in ("transform", "warped_labels", "mapped_points")}
                row.update(task=label, tokens=n, dim=dim)
                rows.append(row)
                print(json.dumps({k: row.get(k) for k in ("case", "tokens", "dice", "tre", "mace", "fold_fraction",
                                                          "seconds")}, default=str), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | Xi tokens (working grid / 4) | metric | folds | s per case |", "|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        metric, _ = METRIC[task]
        for n in dict.fromkeys(r["tokens"] for r in rows if r["task"] == task):
            sel = [r for r in rows if r["task"] == task and r["tokens"] == n]
            side = round(n ** (1 / sel[0]["dim"]), 1)
            vals = [r[metric] for r in sel if r.get(metric) is not None]
            folds = [r["fold_fraction"] for r in sel if r.get("fold_fraction") is not None]
            lines.append(f"| {task} | {n} (~{side:g}^d) | {metric} {np.mean(vals):.3f} | "
                         f"{100 * np.mean(folds):.3f} % | {np.mean([r['seconds'] for r in sel]):.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks carl_grid", description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["oasis", "prostate"])
    ap.add_argument("--tokens3d", type=int, nargs="+", default=[12 * 14 * 12, 16 ** 3, 20 ** 3, 24 ** 3])
    ap.add_argument("--tokens2d", type=int, nargs="+", default=[32 ** 2, 40 ** 2, 48 ** 2, 64 ** 2])
    ap.add_argument("--checkpoint", help="CARL checkpoint (default: the shipped one for the dimension)")
    ap.add_argument("--out", type=Path, help="run folder (default: a new benchmarks/results/<date>-carl-grid/)")
    args = ap.parse_args(argv)
    record = provenance("carl_grid", argv)
    rows = sweep(args.tasks, {3: args.tokens3d, 2: args.tokens2d}, args.checkpoint)
    out = args.out or new_run_dir("carl-grid")
    print(write_run(out, record, {"rows": rows}, table(rows), title="CARL at other grid sizes"))


if __name__ == "__main__":
    main()
