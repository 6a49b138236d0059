"""RAN against the peers, and its ablation, in one run: prostate MR inter-subject (gland Dice and the
Dice of the two small landmark regions), the OASIS brain pair (tissue Dice) and the histology
stains (landmark TRE), with folds, CPU seconds per pair and parameter counts.

    python -m benchmarks ran_eval --tasks prostate oasis histology \\
        --ran ran=ran-3d --ran "ran + IO 50=ran-3d@50" --ran m1=runs/ran/ran-3d-m1.pt \\
        --methods identity ants_syn elastix_bspline sitk_demons optimize carl

``--ran LABEL=CHECKPOINT[@IO[@OPTIONS_JSON]]``: a shipped name (``ran-3d``) or a file; ``@IO`` adds
instance optimisation steps, ``@{"io_lr": 1e-4}`` method options. A 3D checkpoint runs on the 3D tasks, a 2D one on histology (``ran-2d``
names its dimension; a file's card says it). Writes ``results.md`` (tables per task, the ablation
table) and ``ablation.png`` into a new run folder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from benchmarks import new_run_dir, peers, provenance, write_run
from benchmarks.run import METRIC, OURS, ours
from benchmarks.tasks import cases, load

COLUMNS = (("dice", "Dice", ".3f", 1), ("dice_small", "small-structure Dice", ".3f", 1), ("tre", "TRE", ".1f", 1),
           ("fold_fraction", "folds %", ".3f", 100), ("seconds", "s/case", ".1f", 1))


def _card(checkpoint: str) -> dict[str, Any]:
    from napari_register import weights

    return weights.read_card(weights.resolve(checkpoint, checkpoint)) or {}


def _parameters(checkpoint: str) -> int:
    import torch

    from napari_register import weights

    blob = weights.read_blob(weights.resolve(checkpoint, checkpoint))
    return int(sum(v.numel() for v in blob["state_dict"].values() if torch.is_tensor(v) and v.is_floating_point()))


def add_ran(spec: str) -> tuple[str, dict[str, Any]]:
    """Register ``LABEL=CHECKPOINT[@IO[@OPTIONS_JSON]]`` as a harness runner; returns its name and facts."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"--ran wants LABEL=CHECKPOINT[@IO[@OPTIONS_JSON]], got {spec!r}")
    checkpoint, _, io = rest.partition("@")
    io, _, opts = io.partition("@")
    options = json.loads(opts) if opts else None
    card = _card(checkpoint)
    dim = int(card["dim"])
    name = f"ran:{label}"
    peers.RUNNERS[name] = ours("ran", io_steps=int(io or 0), label=f"ours: RAN {label}", dims=(dim,),
                               modalities=("mono", "multi"),
                               checkpoint=checkpoint, options=options)
    return name, {"label": label, "checkpoint": checkpoint, "io_steps": int(io or 0), "options": options, "dim": dim,
                  "config": card.get("config", {}), "steps": card.get("total_steps", card.get("steps")),
                  "parameters": _parameters(checkpoint)}


def table(summary: list[dict[str, Any]], task: str) -> str:
    rows = [s for s in summary if s["task"] == task]
    head = "| method | cases (failed) | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for s in rows:
        cells = [format(s[k] * m, f) if k in s else "-" for k, _, f, m in COLUMNS]
        lines.append(f"| {peers.RUNNERS[s['peer']].label or s['peer']} | {s['cases']} ({s['failed']}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation(summary: list[dict[str, Any]], facts: dict[str, dict[str, Any]]) -> str:
    lines = ["| variant | heads m | q | training steps | parameters | prostate gland Dice | prostate small-structure "
             "Dice | OASIS Dice | folds % (prostate / OASIS) | s/pair (prostate / OASIS) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(s["task"], s["peer"]): s for s in summary}
    for name, f in facts.items():
        if f["dim"] != 3 or f["io_steps"]:
            continue
        p, o = by.get(("prostate", name), {}), by.get(("oasis", name), {})
        g = lambda s, k, fmt, m=1.0: format(s[k] * m, fmt) if k in s else "-"  # noqa: E731
        cfg = f["config"]
        lines.append(f"| {f['label']} | {cfg.get('heads', 6)} | {cfg.get('q', 3)} | {f['steps']} | {f['parameters']:,} | "
                     f"{g(p, 'dice', '.3f')} | {g(p, 'dice_small', '.3f')} | {g(o, 'dice', '.3f')} | "
                     f"{g(p, 'fold_fraction', '.3f', 100)} / {g(o, 'fold_fraction', '.3f', 100)} | "
                     f"{g(p, 'seconds', '.2f')} / {g(o, 'seconds', '.2f')} |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], facts: dict[str, dict[str, Any]], out: Path) -> Optional[Path]:
    from matplotlib.figure import Figure

    by = {(s["task"], s["peer"]): s for s in summary}
    names = [n for n, f in facts.items() if f["dim"] == 3 and not f["io_steps"] and ("prostate", n) in by]
    if not names:
        return None
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    metrics = [("prostate", "dice", "prostate gland"), ("prostate", "dice_small", "prostate landmarks (small)"),
               ("oasis", "dice", "OASIS tissue")]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [by.get((t, n), {}).get(k, float("nan")) for t, k, _ in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], vals, width, label=facts[n]["label"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [m[2] for m in metrics])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("RAN ablation: heads m and motion-aware levels q")
    fig.tight_layout()
    path = out / "ablation.png"
    fig.savefig(path, dpi=110)
    return path


def curves(logs: dict[str, str], window: int = 100) -> str:
    """Mean LNCC term per ``window`` steps of each run's ``log.jsonl``, side by side: runs with one
    seed see the same batches, so the columns compare the networks step for step."""
    import numpy as np

    series = {}
    for label, path in logs.items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        series[label] = {r["step"]: r["sim"] for r in rows if "sim" in r}
    last = min(max(s) for s in series.values())
    first = min(min(s) for s in series.values())
    lines = ["| steps | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
    for start in range(first - first % window + 1, last + 1, window):
        span = range(start, min(start + window, last + 1))
        cells = [format(np.mean([s[k] for k in span if k in s]), ".4f") if any(k in s for k in span) else "-"
                 for s in series.values()]
        lines.append(f"| {span[0]}-{span[-1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    from benchmarks import run as suite

    ap = argparse.ArgumentParser(prog="python -m benchmarks ran_eval", description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["prostate", "oasis", "histology"])
    ap.add_argument("--ran", action="append", default=[], help="LABEL=CHECKPOINT[@IO] (repeatable)")
    ap.add_argument("--methods", nargs="*", default=["identity", "ants_syn", "elastix_bspline", "sitk_demons",
                                                     "optimize", "carl"],
                    help="peers and our other methods to run beside RAN")
    ap.add_argument("--skip", nargs="*", default=[], help="TASK:LABEL pairs to leave out, e.g. 'oasis:ran + IO 50'")
    ap.add_argument("--logs", nargs="*", default=[],
                    help="LABEL=RUN_DIR/log.jsonl: training curves to tabulate side by side (same seed, same batches)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    record = provenance("ran_eval", argv)
    facts = dict(add_ran(s) for s in args.ran)
    peers.RUNNERS.update({k: v for k, v in OURS.items() if k in args.methods})
    names = [m for m in args.methods if m in peers.RUNNERS] + list(facts)
    out = args.out or new_run_dir("ran-eval")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for task in args.tasks:
        for case in cases(task):
            pair = load(case)
            for name in names:
                label = facts[name]["label"] if name in facts else name
                if not peers.RUNNERS[name].applies(case) or f"{task}:{label}" in args.skip:
                    continue
                r = peers.run_peer(name, pair)
                r.pop("transform", None)
                rows.append(suite._clean(r))
                key = METRIC[task][0]
                print(case.name, name, r.get("error", {key: round(r.get(key, float("nan")), 4),
                                                      "small": round(r.get("dice_small", float("nan")), 3),
                                                      "s": round(r.get("seconds", 0), 1)}), flush=True)
            (out / "rows.json").write_text(json.dumps(rows, indent=1))
    summary = peers.summarise(rows)
    parts = [f"## {task}\n\n{table(summary, task)}\n" for task in args.tasks]
    if {"prostate", "oasis"} & set(args.tasks):  # the ablation's columns are these two tasks
        parts.append("## Ablation (3D networks alone, same seed)\n\n" + ablation(summary, facts) + "\n")
    if args.logs:
        parts.append("## Training curves (unsupervised loss on the training batches, mean per window)\n\n"
                     + curves(dict(spec.split("=", 1) for spec in args.logs)) + "\n")
    figure = plot(summary, facts, out)
    if figure is not None:
        parts.append(f"![ablation]({figure.name})\n")
    write_run(out, record, {"rows": rows, "summary": summary, "ran": facts}, "\n".join(parts),
              title="RAN against the peers, and its ablation")
    print(out / "results.md")
