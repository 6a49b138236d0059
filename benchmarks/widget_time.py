"""The Register widget's Run-to-layers time in a real napari viewer, on the brain sample.

    xvfb-run -a python -m benchmarks widget_time [--repeat 3] [--threads 2] [--out FILE.json]

A fresh viewer opens the sample brain pair (the pair and labels ``napari-register demo`` registers),
adds the Register widget and clicks Run with the default settings ``--repeat`` times; each time is
from the click to the result layers being in the viewer (the widget idle again), what the user
waits for after pressing Run. Compare it with the ``demo`` row of ``python -m benchmarks e2e``
(the same registration as a whole command).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks widget_time", description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (as e2e gives every command)")
    ap.add_argument("--out", type=Path, help="write the times as JSON here")
    args = ap.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    torch.set_num_threads(args.threads)
    viewer = napari.Viewer(title="napari-register")
    app = QApplication.instance()
    viewer.open_sample("napari-register", "brain")
    _, register = viewer.window.add_plugin_dock_widget("napari-register", "Register")
    seconds, statuses = [], []
    for _ in range(args.repeat):
        n_layers = len(viewer.layers)
        start = time.perf_counter()
        register.run_button.native.click()
        while register.running or len(viewer.layers) == n_layers:
            app.processEvents()
            time.sleep(0.005)
        seconds.append(time.perf_counter() - start)
        statuses.append(register.status.value)
        print(f"Run to layers: {seconds[-1]:.2f} s | {statuses[-1]!r}", file=sys.stderr)
    viewer.close()
    summary = {"seconds": seconds, "median": statistics.median(seconds), "min": min(seconds),
               "max": max(seconds), "threads": args.threads, "status": statuses}
    print(json.dumps(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
