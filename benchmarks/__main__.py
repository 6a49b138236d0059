"""``python -m benchmarks <command> [args]``: the benchmark suite and the experiments beside it.

Each command is a module of this package with ``main(argv)``; ``python -m benchmarks.<module>``
runs the same thing. ``python -m benchmarks <command> --help`` shows a command's arguments.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

# command -> (module, one line); modules are imported only when their command runs
COMMANDS = {
    "run": ("run", "the suite: every method and peer on every task, one run folder in benchmarks/results/"),
    "broad": ("broad", "the broad benchmark: hundreds of pairs, a dev split (choose) and a test split (report)"),
    "peers": ("peers", "only the peers (ANTs, demons, elastix, OpenCV) on some tasks, table to stdout"),
    "carl_grid": ("carl_grid", "CARL at several working-grid sizes (the `tokens` option)"),
    "carl_eval": ("carl_eval", "CARL and CARL + IO on some tasks, or the timing of its network and IO"),
    "io_trace": ("io_trace", "Dice and folds along one run of instance optimisation, from its preview maps"),
    "photo_eval": ("photo_eval", "homography on held-out photos: MACE, acceptable rate, AUC; ART steps and ablation"),
    "batch": ("batch", "cohort throughput: 1 and 2 Dask workers against a plain loop on the prostate pairs"),
    "ran_eval": ("ran_eval", "RAN against the peers and its ablation (heads, motion-aware levels): Dice, small-structure Dice, folds"),
    "ran_heldout": ("ran_heldout", "RAN checkpoints on held-out training-style pairs: field error, LNCC, folds (for choosing)"),
    "alto_eval": ("alto_eval", "AltO against the peers on the photo homography task: MACE, acceptable rate, AUC"),
    "shift_experiment": ("shift_experiment", "translation equivariance: CARL against a U-Net, fixed image shifted"),
    "soak": ("soak", "50 registrations back to back in one process: RSS and threads at start and end"),
    "widget_time": ("widget_time", "the Register widget's Run-to-layers time in a real viewer (brain sample)"),
    "e2e": ("e2e", "whole commands as the user waits for them (ours, the demo, the peers): seconds and peak memory"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m benchmarks <command> [args]   (python -m benchmarks <command> --help)", "",
             "commands:"]
    lines += [f"  {name:{width}s}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Results: benchmarks/results/<run-name>/ (index: benchmarks/results/README.md).",
              "Tasks, peers and settings: docs/benchmarks.md."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name not in COMMANDS:
        print(f"python -m benchmarks: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{COMMANDS[name][0]}")
    return module.main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
