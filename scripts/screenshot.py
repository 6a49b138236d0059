"""docs/screenshot.png: what a user sees after pressing Run on the brain sample, nothing arranged by hand.

A fresh viewer opens the brain sample (File > Open Sample > napari-register > Brain pair), adds the
Register widget (Plugins > napari-register > Register), presses its Run button with the default
settings, waits for the result and saves the window (canvas and docks).

Run under a (virtual) display: ``xvfb-run -a python scripts/screenshot.py [out.png]``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import napari
from qtpy.QtWidgets import QApplication

ROOT = Path(__file__).resolve().parent.parent


def wait(app: QApplication, done: Callable[[], bool], timeout: float = 1800.0) -> None:
    """Run the event loop until ``done()`` (the worker reports through it)."""
    start = time.time()
    while not done():
        app.processEvents()
        time.sleep(0.05)
        if time.time() - start > timeout:
            raise TimeoutError("registration did not finish in time")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshot.png"
    viewer = napari.Viewer(title="napari-register")
    app = QApplication.instance()
    viewer.window._qt_window.resize(1500, 900)  # no public resize; a fixed size keeps the picture stable
    viewer.open_sample("napari-register", "brain")
    _, register = viewer.window.add_plugin_dock_widget("napari-register", "Register")
    register.run_button.native.click()
    wait(app, lambda: not register.running)
    print(register.status.value)
    for _ in range(20):  # let the canvas draw the new layers
        app.processEvents()
        time.sleep(0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    print("saved", out)
    viewer.close()


if __name__ == "__main__":
    main()
