"""Dock widget "Registration QA": visual comparisons, Dice, TRE, folds and the table of runs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSlider, Label, PushButton, SpinBox, Table
from napari.layers import Image as ImageLayer
from napari.layers import Labels, Points
from napari.utils.notifications import show_error

from .. import metrics, qa
from ..image import Image
from ..transforms import MatrixTransform, warp_image
from . import session as ses
from .layers import META_KEY, image_from_layer, image_layer, points_phys, same_place
from .result_view import draw_grid
from .pickers import layer_choices

VIEWS = ("checkerboard", "difference", "blend")


def _mean(values: Any) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def labels_on_grid(layer: Any, reference: Any) -> np.ndarray:
    """Label array of ``layer`` on ``reference``'s grid (nearest-neighbour resampling when they differ)."""
    if same_place(layer, reference) and layer.data.shape == reference.data.shape:
        return np.asarray(layer.data)
    img, ref = image_from_layer(layer), image_from_layer(reference)
    return warp_image(img, MatrixTransform(np.eye(ref.ndim + 1)), ref.geometry, labels=True).array


class QAWidget(Container):
    """Compare fixed and warped, measure Dice/TRE/folds of a run, keep the table of every run."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.session = ses.session_for(viewer)
        self._announced: Optional[ses.Run] = None  # the newest run already selected and measured
        self.run = ComboBox(label="run", choices=self._run_choices, nullable=True)
        self.image_a = ComboBox(label="fixed image", choices=layer_choices(viewer, ImageLayer))
        self.image_b = ComboBox(label="warped image", choices=layer_choices(viewer, ImageLayer))
        self.view = ComboBox(label="view", choices=list(VIEWS))
        self.tile = SpinBox(label="tile size (vox)", min=2, max=4096, value=32)
        self.alpha = FloatSlider(label="blend", min=0.0, max=1.0, value=0.5)
        self.show_button = PushButton(text="Show view")
        self.grid_spacing = SpinBox(label="grid spacing (vox)", min=2, max=1024, value=8)
        self.labels_a = ComboBox(label="labels (fixed)", choices=layer_choices(viewer, Labels), nullable=True)
        self.labels_b = ComboBox(label="labels (warped)", choices=layer_choices(viewer, Labels), nullable=True)
        self.points_a = ComboBox(label="points (fixed)", choices=layer_choices(viewer, Points), nullable=True)
        self.points_b = ComboBox(label="points (warped)", choices=layer_choices(viewer, Points), nullable=True)
        self.measure_button = PushButton(text="Measure Dice / TRE")
        self.result = Label(value="")
        self.table = Table(value=self._table_value())
        self.table.min_height = 120
        self.save_button = PushButton(text="Save table as CSV...")
        self.extend([self.run, self.image_a, self.image_b, self.view, self.tile, self.alpha, self.show_button,
                     self.grid_spacing, self.labels_a, self.labels_b, self.points_a, self.points_b,
                     self.measure_button, self.result, self.table, self.save_button])
        for combo in (self.labels_a, self.labels_b, self.points_a, self.points_b):
            combo.value = None
        self.show_button.clicked.connect(lambda: self._guard(self.show_view))
        self.measure_button.clicked.connect(lambda: self._guard(self.measure))
        self.save_button.clicked.connect(self._save_dialog)
        self.run.changed.connect(self._on_run_selected)
        self.grid_spacing.changed.connect(lambda v: self._guard(self.set_grid_spacing, v))
        self.session.changed.connect(self._on_session_changed)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            ev.connect(self.reset_choices)
        self.reset_choices()
        self._on_session_changed()

    def _run_choices(self, _w: Any = None) -> list[tuple[str, Any]]:
        return [(run.name, run) for run in reversed(self.session.runs)]

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # a QA mistake (wrong layers) is a message, never a dead widget
            self.result.value = str(e)
            show_error(f"Registration QA: {e}")

    def reset_choices(self, *_: Any) -> None:
        super().reset_choices()
        # reference pickers default to the user's own "fixed..." layers, not to results
        for combo in (self.labels_a, self.points_a):
            if combo.value is None:
                fixed = [layer for layer in combo.choices if layer is not None and "fixed" in layer.name.lower()
                         and META_KEY not in layer.metadata]
                if fixed:
                    combo.value = fixed[0]

    # ------------------------------------------------------------------ runs
    def _on_session_changed(self) -> None:
        latest = self.session.runs[-1] if self.session.runs else None
        self.reset_choices()
        if latest is not None and latest is not self._announced:
            self._announced = latest  # a new run: select it and measure it with the current references
            self.run.value = latest
            self._guard(self.measure, False)
        self._refresh_table()

    def _on_run_selected(self, run: Optional[ses.Run]) -> None:
        if run is None:
            return
        alive = {role: layer for role, layer in run.layers.items() if layer in self.viewer.layers}
        if run.fixed_layer in self.viewer.layers:
            self.image_a.value = run.fixed_layer
        for combo, role in ((self.image_b, "warped"), (self.labels_b, "labels"), (self.points_b, "points")):
            if role in alive:
                combo.value = alive[role]
        with self.grid_spacing.changed.blocked():
            self.grid_spacing.value = int(run.grid_spacing)
        self.result.value = f"{run.name}: folds {100 * run.result.fold_fraction:.3f} % of voxels (|J| <= 0)"

    def set_grid_spacing(self, spacing: float) -> None:
        """Redraw the selected run's deformation grid with lines every ``spacing`` voxels."""
        if self.run.value is not None:
            draw_grid(self.viewer, self.run.value, spacing)

    # ------------------------------------------------------------------ views
    def show_view(self) -> None:
        """Add (or refresh) the layer 'QA <view>' comparing the fixed and the warped image."""
        a_layer, b_layer = self.image_a.value, self.image_b.value
        if a_layer is None or b_layer is None:
            raise ValueError("pick a fixed and a warped image layer")
        a, b = image_from_layer(a_layer), image_from_layer(b_layer)
        rgb = a.rgb and b.rgb
        xa, xb = (a.array, b.array) if rgb else (a.luminance(), b.luminance())
        view = self.view.value
        kwargs: dict[str, Any] = {"colormap": "gray"}
        if view == "checkerboard":
            tiles = [max(1, round(s / self.tile.value)) for s in a.shape]
            arr = qa.checkerboard(xa, xb, tiles, rgb=rgb)
        elif view == "difference":
            arr = qa.difference(a.luminance(), b.luminance())
            kwargs = {"colormap": "PiYG", "contrast_limits": (-1, 1)}
        else:
            arr = qa.blend(xa, xb, self.alpha.value)
        colour = arr.ndim > a.ndim  # an RGB view (checkerboard/blend of two photos)
        if colour:
            kwargs = {}
        name = f"QA {view}"
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == arr.shape:
            self.viewer.layers[name].data = arr
        else:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            data, kw, _ = image_layer(Image(arr, a.geometry, channels=colour, rgb=colour), name, **kwargs)
            self.viewer.add_image(data, **kw)

    # ------------------------------------------------------------------ numbers
    def measure(self, strict: bool = True) -> dict[str, Any]:
        """Dice (mean over labels) between the two label layers and TRE (mean, max; physical units)
        between the two points layers; stored on the selected run. ``strict``: complain when nothing
        can be measured."""
        out: dict[str, Any] = {}
        la, lb, pa, pb = self.labels_a.value, self.labels_b.value, self.points_a.value, self.points_b.value
        if la is not None and lb is not None and la is not lb:
            per_label = metrics.dice(np.asarray(la.data), labels_on_grid(lb, la))
            out["dice_per_label"] = per_label
            out["dice"] = _mean(per_label.values())
        if pa is not None and pb is not None and pa is not pb:
            t = metrics.tre(points_phys(pa), points_phys(pb))
            out["tre"] = (t["mean"], t["max"])
        if not out:
            if strict:
                raise ValueError("pick two label layers (Dice) and/or two points layers (TRE)")
            return out
        text = []
        if "dice" in out:
            labels = ", ".join(f"{k}: {v:.3f}" for k, v in out["dice_per_label"].items())
            text.append(f"Dice {out['dice']:.4f} ({labels})")
        if "tre" in out:
            text.append(f"TRE mean {out['tre'][0]:.3f}, max {out['tre'][1]:.3f}")
        run = self.run.value
        if run is not None:
            run.dice = out.get("dice", run.dice)
            run.tre = out.get("tre", run.tre)
            text.append(f"folds {100 * run.result.fold_fraction:.3f} %")
            self._refresh_table()
        self.result.value = "\n".join(text)
        return out

    def _refresh_table(self) -> None:
        self.table.value = self._table_value()
        self.table.native.resizeColumnsToContents()

    def _table_value(self) -> dict[str, list]:
        rows = self.session.rows()
        return {"data": [list(r.values()) for r in rows], "index": list(range(1, len(rows) + 1)),
                "columns": list(ses.COLUMNS)}

    def save_csv(self, path: str | Path) -> Path:
        """The table of every run of this session as CSV."""
        return self.session.save_csv(path)

    def _save_dialog(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, "Save runs table", "registration_runs.csv", "CSV (*.csv)")
        if path:
            self._guard(self.save_csv, path)
