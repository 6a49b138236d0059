"""Dock widgets "Register" and "Registration QA": thin front ends over :func:`iter_register`.

The registration runs in a napari worker thread (:func:`session.run_job`); the widget only turns its
progress into the progress bar, the status line and a live preview layer, and its result into layers
styled for judging it (:mod:`.result_view`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import napari
import numpy as np
import torch
from magicgui.widgets import CheckBox, ComboBox, Container, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image as ImageLayer
from napari.layers import Labels, Points
from napari.utils.notifications import show_error, show_info

from ..api import homography_first, resolve_device
from ..errors import InputError
from ..methods.registry import get_method, list_methods
from ..progress import Cancelled, Progress
from . import result_view as view
from . import session as ses
from .layers import image_from_layer, image_layer, points_phys
from .pickers import layer_choices, shipped_checkpoints

log = logging.getLogger(__name__)
FROM_FILE = "from file..."


class RegisterWidget(Container):
    """Pick moving/fixed layers and a method, run it in a worker, add the result layers."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()  # first: magicgui's Container refuses attributes before its own init
        self.viewer = viewer
        self.session = ses.session_for(viewer)
        self.method_options: Optional[dict] = None  # advanced: method options (e.g. {"levels": [4]}), for scripts
        self.worker: Any = None
        self._cancel = False
        self._job: dict[str, Any] = {}
        self._preview: Any = None
        self._extra_checkpoints: list[str] = []
        self._seen: set[int] = set()  # ids of layers already offered (auto-pick only new ones)
        self._defaults_for: Optional[tuple[str, str]] = None  # (method, device) the IO steps were set for
        self._started = 0.0
        self._estimate = ""
        self.moving = ComboBox(label="moving", choices=layer_choices(viewer, ImageLayer, "warped"))
        self.fixed = ComboBox(label="fixed", choices=layer_choices(viewer, ImageLayer, "warped"))
        self.moving_labels = ComboBox(label="moving labels", choices=layer_choices(viewer, Labels, ndim=lambda: self.dim),
                                     nullable=True)
        self.moving_points = ComboBox(label="moving points", choices=layer_choices(viewer, Points, ndim=lambda: self.dim),
                                     nullable=True)
        self.prealign = ComboBox(label="pre-align", choices=self._prealign_choices, nullable=True,
                                 tooltip="homography first, then deformable: start from the matrix of an "
                                         "earlier run on this pair (a homography method, e.g. alto)")
        self.method = ComboBox(label="method", choices=self._method_choices)
        self.checkpoint = ComboBox(label="checkpoint", choices=self._checkpoint_choices)
        self.settings = ComboBox(label="settings", choices=self._settings_choices,
                                 tooltip="the method's option set for a kind of data (README: brain settings)")
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda"])
        self.io_steps = SpinBox(label="IO steps", min=0, max=10000, value=0,
                                tooltip="instance-optimisation steps (Run: after the method; "
                                        "Instance optimisation: steps to continue, 50 when 0)")
        self.run_button = PushButton(text="Run")
        self.io_button = PushButton(text="Instance optimisation", enabled=False)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=100, value=0)  # % of the whole run
        self.status = Label(value="")
        self.status.native.setWordWrap(True)  # a long stage name must not widen the dock
        self.before = CheckBox(text="show the moving image (before)", value=False, enabled=False,
                               tooltip="swap the result for the unregistered moving image, over the fixed one")
        buttons = Container(widgets=[self.run_button, self.io_button, self.cancel_button], layout="horizontal",
                            labels=False)
        self.extend([self.moving, self.fixed, self.moving_labels, self.moving_points, self.prealign, self.method,
                     self.checkpoint,
                     self.settings, self.device, self.io_steps, buttons, self.progress, self.status, self.before])
        self.moving_labels.value = None
        self.moving_points.value = None
        self.prealign.value = None
        self._grey_out_cuda()
        for w in (self.moving, self.fixed):
            w.changed.connect(self._on_layers_changed)
        self.method.changed.connect(self._on_method_changed)
        self.checkpoint.changed.connect(self._on_checkpoint_changed)
        self.device.changed.connect(self._reset_io_steps)
        self.before.changed.connect(self._on_before)
        self.run_button.clicked.connect(lambda: self.run())
        self.io_button.clicked.connect(lambda: self.run(continue_run=True))
        self.cancel_button.clicked.connect(self.cancel)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            ev.connect(self.reset_choices)
        viewer.dims.events.order.connect(self._redraw_grids)
        self.reset_choices()

    def reset_choices(self, *_: Any) -> None:
        """Refresh every picker from the viewer's layers, then guess moving/fixed from layer names."""
        super().reset_choices()
        new = [layer for layer in self.viewer.layers if id(layer) not in self._seen]
        self._seen = {id(layer) for layer in self.viewer.layers}
        images = list(self.fixed.choices)
        if self.fixed.value is self.moving.value and len(images) >= 2:  # e.g. right after opening a pair
            fix = next((layer for layer in images if "fixed" in layer.name.lower()), images[0])
            others = [layer for layer in images if layer is not fix]
            self.fixed.value = fix
            self.moving.value = next((layer for layer in others if "moving" in layer.name.lower()), others[0])
        for combo in (self.moving_labels, self.moving_points):  # a newly opened "moving..." labels/points layer
            fresh = [layer for layer in combo.choices if layer in new and "moving" in layer.name.lower()]
            if combo.value is None and fresh:
                combo.value = fresh[0]
        self._on_layers_changed()

    # ------------------------------------------------------------------ pickers
    @property
    def dim(self) -> Optional[int]:
        return None if self.fixed.value is None else self.fixed.value.ndim

    def _method_choices(self, _w: Any = None) -> list[str]:
        if self.dim not in (2, 3):
            return []
        # The network-free baseline first (it fits any pair; a trained method is a deliberate choice),
        # then methods that can run now (no checkpoint needed, or one shipped).
        ready = (lambda m: not get_method(m).needs_checkpoint or bool(shipped_checkpoints(m, self.dim)))
        return sorted(list_methods(self.dim), key=lambda m: (m != "optimize", not ready(m)))

    def _prealign_choices(self, _w: Any = None) -> list[tuple[str, Any]]:
        """Earlier runs on this very pair whose result is a matrix (homography or affine) or comes
        with one (the homography fitted to ART's dense map)."""
        return [(f"{run.name} (matrix)", run) for run in self.session.runs
                if run.fixed_layer is self.fixed.value and run.moving_layer is self.moving.value
                and run.result.matrix is not None]

    def _refresh_prealign(self) -> None:
        self.prealign.reset_choices()
        self.prealign.visible = any(c is not None for c in self.prealign.choices)  # shown once there is one

    def _checkpoint_choices(self, _w: Any = None) -> list[tuple[str, Any]]:
        name, dim = getattr(self, "method", None) and self.method.value, self.dim
        if name is None or dim is None or not get_method(name).needs_checkpoint:
            return [("(none)", None)]
        extra = [(Path(p).name, p) for p in self._extra_checkpoints]
        return shipped_checkpoints(name, dim) + extra + [(FROM_FILE, FROM_FILE)]

    def _presets(self) -> dict[str, dict[str, Any]]:
        """The chosen method's named option sets for the fixed image's dimensionality."""
        name = getattr(self, "method", None) and self.method.value
        return get_method(name).presets.get(self.dim, {}) if name else {}

    def _settings_choices(self, _w: Any = None) -> list[str]:
        return ["default", *self._presets()]

    def _grey_out_cuda(self) -> None:
        if not torch.cuda.is_available():
            item = self.device.native.model().item(2)
            item.setEnabled(False)
            item.setToolTip("no CUDA GPU found")

    def _on_layers_changed(self, *_: Any) -> None:
        for combo in (self.moving_labels, self.moving_points):  # offer only those of the pair's dimension
            combo.reset_choices()
        self._refresh_prealign()
        self.method.reset_choices()
        self._on_method_changed()
        self._check()

    def _refresh_checkpoints(self) -> None:
        self.checkpoint.reset_choices()
        if list(self.checkpoint.choices) != [value for _, value in self._checkpoint_choices()]:
            # magicgui keeps the items that stay and appends new ones, which would list a new
            # checkpoint after "from file..." (carl-2d -> carl-3d, a file picked): rebuild in order.
            self.checkpoint.choices = []
            self.checkpoint.choices = self._checkpoint_choices

    def _on_method_changed(self, *_: Any) -> None:
        self._refresh_checkpoints()
        self.settings.reset_choices()
        self.settings.visible = len(self.settings.choices) > 1  # only methods that have presets
        self._reset_io_steps()

    def _reset_io_steps(self, *_: Any) -> None:
        """The chosen method's default IO steps on the chosen device (CARL: none on the CPU, where
        they take minutes); only a new method or device resets what the user typed."""
        key = (self.method.value, self.device.value)
        if key[0] is None or key == self._defaults_for:
            return
        self._defaults_for = key
        try:
            device = resolve_device(self.device.value)
        except InputError:  # "cuda" without a GPU (greyed out; Run reports it)
            device = torch.device("cpu")
        self.io_steps.value = get_method(key[0]).io_steps_default(device)

    def _on_checkpoint_changed(self, value: Any) -> None:
        if value != FROM_FILE:
            return
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self.native, "Checkpoint", "", "PyTorch checkpoint (*.pt *.pth)")
        if path:
            self._extra_checkpoints.append(path)
            self._refresh_checkpoints()
            self.checkpoint.value = path
        else:
            self._refresh_checkpoints()

    def _check(self) -> Optional[str]:
        """Why Run cannot start now (also shown in the status line), or None."""
        mov, fix = self.moving.value, self.fixed.value
        problem = None
        if mov is None or fix is None:
            problem = "open a moving and a fixed image layer"
        elif mov is fix:
            problem = "moving and fixed are the same layer; pick two images"
        elif mov.ndim != fix.ndim:
            problem = (f"moving '{mov.name}' is {mov.ndim}D but fixed '{fix.name}' is {fix.ndim}D: "
                       "pick two 2D or two 3D images")
        elif not self.method.choices:
            problem = f"no registration method for {fix.ndim}D images"
        running = self.running
        self.run_button.enabled = problem is None and not running
        self.io_button.enabled = problem is None and not running and self._current_run() is not None
        self.before.enabled = not running and self._current_run() is not None
        if problem:
            self.status.value = problem
        return problem

    def _current_run(self) -> Optional[ses.Run]:
        """The latest run on the selected pair, which instance optimisation continues."""
        for run in reversed(self.session.runs):
            if run.moving_layer is self.moving.value and run.fixed_layer is self.fixed.value:
                return run
        return None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _redraw_grids(self, *_: Any) -> None:
        """Another plane is on screen (axes rolled): redraw every grid with that plane's lines."""
        for run in self.session.runs:
            view.draw_grid(self.viewer, run)

    def _on_before(self, before: bool) -> None:
        run = self._current_run()
        if run is not None:
            view.show_before(self.viewer, run, before)

    # ------------------------------------------------------------------ running
    def run(self, continue_run: bool = False) -> None:
        """Start a registration (or continue the current one) in a worker thread."""
        from napari.qt.threading import create_worker

        problem = self._check()
        if problem or self.running:
            show_info(problem or "a registration is already running")
            return
        parent = self._current_run() if continue_run else None
        if continue_run and parent is None:
            show_info("run a registration on this pair first; instance optimisation continues its result")
            return
        try:
            job = self._job_arguments(parent)
        except Exception as e:  # unreadable layers, bad checkpoint choice...
            show_error(f"cannot start the registration: {e}")
            return
        self._cancel = False
        # what the result belongs to, fixed now: the pickers may change while the job runs
        self._job = dict(number=self.session.next_number(), parent=parent, method=job["method"],
                         options=job["options"], grid_spacing=ses.default_grid_spacing(job["fixed"].shape),
                         moving=self.moving.value, fixed=self.fixed.value, points=self.moving_points.value)
        self.worker = create_worker(ses.run_job, _start_thread=False, _ignore_errors=True, **job)
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._on_finished)
        self.cancel_button.enabled = True
        self._check()
        self.progress.value = 0
        self.status.value = "starting..."
        self._started, self._estimate = time.perf_counter(), ""
        self.worker.start()

    def _job_arguments(self, parent: Optional[ses.Run]) -> dict[str, Any]:
        fixed = image_from_layer(self.fixed.value)
        checkpoint = self.checkpoint.value
        if checkpoint == FROM_FILE:
            raise ValueError("choose a checkpoint file (or a shipped checkpoint) first")
        steps = self.io_steps.value
        preset = self._presets().get(self.settings.value, {})
        options = {**preset, **(self.method_options or {})} or None  # script-set options override the preset
        kwargs = dict(method=self.method.value, checkpoint=checkpoint, io_steps=steps, device=self.device.value,
                      options=options)
        if parent is None and self.prealign.value is not None:
            kwargs["prealign"] = homography_first(self.prealign.value.result)
        if parent is not None:  # same method, same pair, same options; only more steps
            r = parent.result
            kwargs.update(method=r.method, checkpoint=r.checkpoint, init=r, options=parent.options,
                          io_steps=steps or 50)
        labels = self.moving_labels.value
        points = self.moving_points.value
        return dict(moving=image_from_layer(self.moving.value), fixed=fixed, cancelled=lambda: self._cancel,
                    threads=torch.get_num_threads(),  # the process's, as the CLI and scripts get
                    labels=None if labels is None else image_from_layer(labels),
                    points=None if points is None else points_phys(points), **kwargs)

    def cancel(self) -> None:
        """Ask the running registration to stop at its next step (well under a second)."""
        self._cancel = True
        self.status.value = "cancelling..."

    def _on_progress(self, p: Progress) -> None:
        if p.message is not None:  # the run changed something on the user's behalf (resolution, device)
            show_info(p.message)
            return
        if self._cancel:  # "cancelling..." stays until the run stops
            return
        if p.fraction is not None:
            self.progress.value = round(100 * p.fraction)
        if p.stage == "estimate":  # kept under the stage lines: they follow within milliseconds
            self._estimate = str(p)  # "estimated time: about 12 s"
            self.status.value = self._estimate
        elif p.stage != "done":  # the result's own line follows
            self.status.value = f"{p}\n{self._estimate}"  # "[k/n] stage i/m ... 48% 6 s left"
        if p.warped is not None:  # live preview of the alignment
            if self._preview is None or self._preview not in self.viewer.layers:
                data, kw, _ = image_layer(p.warped, f"{self._job['method']} #{self._job['number']} warped (preview)",
                                          **({} if p.warped.rgb else {"colormap": "green", "blending": "additive"}))
                self._preview = self.viewer.add_image(data, **kw)
            else:
                self._preview.data = p.warped.array

    def _on_returned(self, out: Any) -> None:
        self._drop_preview()
        if isinstance(out, ses.Failed):
            self.progress.value = 0
            err = out.error
            if isinstance(err, Cancelled):
                self.status.value = "cancelled; the layers are as they were"
            elif isinstance(err, (ValueError, OSError, MemoryError)):  # bad input (InputError) or a file problem
                self.status.value = f"failed: {err}"
                show_error(f"cannot register: {err}")
            else:  # a bug: the traceback goes to the log
                log.error("registration failed", exc_info=err)
                self.status.value = f"failed: {type(err).__name__}: {err}"
                show_error(f"registration failed (internal error, details in the log): {type(err).__name__}: {err}")
            return
        job = self._job
        run = ses.Run(job["number"], out.result, job["fixed"], job["moving"], options=job["options"],
                      parent=job["parent"] and job["parent"].number, grid_spacing=job["grid_spacing"])
        pts = job["points"]
        # warped landmarks as large as the user's, in a colour of their own
        size = float(np.mean(pts.size)) if pts is not None and len(pts.data) else 10.0
        style = {} if pts is None else {"face_color": "yellow", "size": size}
        for role, (data, kw, kind) in view.result_layers(run, out, style).items():
            run.layers[role] = getattr(self.viewer, f"add_{kind}")(data, **kw)
        view.show_result(self.viewer, run, self.session.runs)
        with self.before.changed.blocked():
            self.before.value = False
        self.session.add(run)  # the QA widget measures it
        self._refresh_prealign()  # a matrix run can seed the next one
        self.progress.value = 100
        r = out.result
        loss = "" if r.loss is None else f", loss {r.loss:.4f}"
        # Run to layers, then the registration alone (what the CLI and the benchmark report)
        self.status.value = (f"{run.name}: {time.perf_counter() - self._started:.1f} s (registration "
                             f"{r.seconds:.1f} s){loss}, folds {100 * r.fold_fraction:.3f} %")

    def _drop_preview(self) -> None:
        if self._preview is not None and self._preview in self.viewer.layers:
            self.viewer.layers.remove(self._preview)
        self._preview = None

    def _on_finished(self) -> None:
        self._drop_preview()  # also after an error escaping the job
        self.worker = None
        self.cancel_button.enabled = False
        if not self.session.runs or self.session.runs[-1].number != self._job.get("number"):
            self.progress.value = 0  # no result (an error escaping the job): nothing done
        self._check()

