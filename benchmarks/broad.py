"""The broad benchmark: hundreds of pairs, split once into dev (choose settings) and test (report).

    python -m benchmarks broad --split dev|test [--quick] [--tasks ...] [--methods ...] [--options JSON]

Tasks (pairs and splits: :mod:`napari_register.data.splits`; loading and scoring:
:mod:`benchmarks.tasks`): ``prostate_pairs`` (every ordered inter-subject MR pair of a split, gland
Dice), ``mr_us_all`` (MR -> ultrasound, gland Dice), ``brains`` (every ordered pair of four brains of
different sizes, crops and intensity ranges, GM/WM Dice) and ``histology_pairs`` (every ordered stain
pair of the CIMA lesion, landmark TRE in original pixels).

Each pair is first scored unregistered (``identity``); a *failure* is a pair that ends worse than
that (Dice lower by more than 0.001, TRE higher by more than 0.01). A trained method is run only on
pairs no training file belongs to (``splits.seen_in_training``); its pair count says how many.
Per task and method: mean, median, the tail (10th percentile of Dice; 90th of TRE), failures,
seconds. Writes ``results.json`` / ``results.md`` into a new ``benchmarks/results/<date>-broad-<split>/``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks import new_run_dir, peers, provenance, write_run
from benchmarks.run import _available_ours, _clean, ours
from benchmarks.tasks import BROAD, Case, cases, load
from napari_register.data import skip_reason, splits

# the main metric of a task and whether higher is better
METRIC = {"prostate_pairs": ("dice", True), "mr_us_all": ("dice", True), "brains": ("dice", True),
          "histology_pairs": ("tre", False)}
TOLERANCE = {"dice": 1e-3, "tre": 1e-2}  # "worse than the start" beyond float noise
DEFAULT_METHODS = ("optimize", "optimize_mind", "carl", "ran", "art", "alto", "ants_syn")
QUICK_PAIRS = 2  # pairs per task with --quick


def _trained(name: str) -> bool:
    return name.split("_")[0] in ("carl", "ran", "art", "alto")


def task_cases(task: str, split: str, quick: bool) -> list[Case]:
    out = cases(task, split)
    if quick:  # spread over the list, not its first pairs (which share a moving image)
        step = max(len(out) // QUICK_PAIRS, 1)
        out = out[::step][:QUICK_PAIRS]
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, method): pairs, mean, median, tail, failures (against identity on the same pair)."""
    start = {(r["task"], r["case"]): r for r in rows if r["peer"] == "identity"}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["peer"]), []).append(r)
    out = []
    for (task, method), rs in groups.items():
        key, higher = METRIC[task]
        ok = [r for r in rs if key in r]
        vals = np.array([r[key] for r in ok], dtype=float)
        s: dict[str, Any] = {"task": task, "peer": method, "pairs": len(rs), "errors": len(rs) - len(ok)}
        if len(vals):
            s.update(mean=float(vals.mean()), median=float(np.median(vals)),
                     tail=float(np.percentile(vals, 10 if higher else 90)))
            worse = 0
            for r in ok:
                base = start.get((task, r["case"]), {}).get(key)
                if base is not None and ((r[key] < base - TOLERANCE[key]) if higher else (r[key] > base + TOLERANCE[key])):
                    worse += 1
            s["failures"] = worse + s["errors"]
        secs = [r["seconds"] for r in rs if "seconds" in r]
        if secs:
            s["seconds"] = float(np.mean(secs))
        folds = [r["fold_fraction"] for r in rs if "fold_fraction" in r]
        if folds:
            s["fold_fraction"] = float(np.mean(folds))
        out.append(s)
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = []
    for task in dict.fromkeys(s["task"] for s in summary):
        key, higher = METRIC[task]
        rows = sorted((s for s in summary if s["task"] == task), key=lambda s: (s["peer"] != "identity", s["peer"]))
        tail = "p10" if higher else "p90"
        lines += [f"### {task} ({key}, {'higher' if higher else 'lower'} is better)", "",
                  f"| method | pairs | mean | median | {tail} | failures | s/pair | folds % |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in rows:
            label = peers.RUNNERS[s["peer"]].label if s["peer"] in peers.RUNNERS else s["peer"]
            f = lambda k, fmt, m=1.0: format(s[k] * m, fmt) if k in s else "-"  # noqa: E731
            fmt = ".3f" if higher else ".2f"
            lines.append(f"| {label} | {s['pairs']} | {f('mean', fmt)} | {f('median', fmt)} | {f('tail', fmt)} | "
                         f"{s.get('failures', '-') if s['peer'] != 'identity' else '-'} | {f('seconds', '.1f')} | "
                         f"{f('fold_fraction', '.3f', 100)} |")
        lines.append("")
    return "\n".join(lines)


def run(tasks: list[str], split: str, methods: list[str], quick: bool, save=None) -> list[dict[str, Any]]:
    runners = {**peers.RUNNERS, **_available_ours()}
    peers.RUNNERS.update(runners)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        for case in task_cases(task, split, quick):
            pair = load(case)
            seen = splits.seen_in_training([case.moving, case.fixed])
            for name in ["identity", *methods]:
                if name not in runners or not runners[name].applies(case) or (seen and _trained(name)):
                    continue
                r = peers.run_peer(name, pair)
                r.pop("transform", None)
                rows.append({**_clean(r), "split": split})
                key = METRIC[task][0]
                print(case.name, name, r.get("error", {key: round(r.get(key, float("nan")), 4),
                                                      "s": round(r.get("seconds", 0), 1)}), flush=True)
                if save is not None:
                    save(rows)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks broad", description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=splits.SPLITS, required=True)
    ap.add_argument("--tasks", nargs="+", default=list(BROAD), choices=list(BROAD))
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                    help="runner names (benchmarks.run.OURS, peers.RUNNERS); identity always runs")
    ap.add_argument("--options", action="append", default=[], help="a JSON object: an extra runner "
                    "'optimize_optsN' with these options (for choosing settings on dev); repeatable")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_PAIRS} pairs per task")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"nothing to run: {reason}")
        return 0
    methods = list(args.methods)
    for i, text in enumerate(args.options, 1):
        peers.RUNNERS[f"optimize_opts{i}"] = ours("optimize", options=json.loads(text),
                                                 label=f"ours: optimize {text}", modalities=("mono", "multi"))
        methods.append(f"optimize_opts{i}")
    record = provenance("broad", argv)
    out = args.out or new_run_dir(f"broad-{args.split}{'-quick' if args.quick else ''}")
    print(f"writing {out}", flush=True)
    t0 = time.time()

    def save(rows: list[dict[str, Any]]) -> str:
        summary = summarise(rows)
        note = f"split {args.split}; {peers.THREADS} threads; {time.time() - t0:.0f} s so far."
        return write_run(out, record, {"rows": rows, "summary": summary}, markdown(summary),
                         title=f"Broad benchmark, {args.split} split", note=note)

    rows = run(args.tasks, args.split, methods, args.quick, save)
    print(save(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
