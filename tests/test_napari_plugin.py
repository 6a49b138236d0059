"""The napari plugin in the real napari (virtual display through pytest-xvfb, PySide6).

The samples are downsampled here (spacing scaled up, so they stay in the same physical place) and
``optimize`` gets a short schedule, so every registration takes seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_register import metrics, read_image, write_image  # noqa: E402
from napari_register.coords import Geometry  # noqa: E402
from napari_register.image import Image  # noqa: E402
from napari_register._napari import layers as L  # noqa: E402
from napari_register._napari.qa_widget import QAWidget  # noqa: E402
from napari_register._napari.reader import get_reader  # noqa: E402
from napari_register._napari.sample_data import sample_dir  # noqa: E402
from napari_register._napari.widgets import RegisterWidget  # noqa: E402

FAST_2D = {"levels": [8, 4, 2], "iterations": [100, 60, 40], "lr": 1.0}  # on the 4x downsampled histology pair
FAST_3D = {"levels": [2, 1], "iterations": [40, 20]}  # on the 3x downsampled brain pair
WAIT_MS = 120_000


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def downsample(image: Image, f: int) -> Image:
    """Every f-th voxel, spacing times f: the same physical place, f**d times fewer voxels."""
    g = image.geometry
    arr = np.ascontiguousarray(image.array[(slice(None, None, f),) * g.ndim])
    return image.with_array(arr, geometry=Geometry(arr.shape[:g.ndim], tuple(s * f for s in g.spacing),
                                                   g.origin, g.direction))


def add(viewer, image: Image, name: str, kind: str = "image"):
    data, kw, _ = L.image_layer(image, name, kind)
    return getattr(viewer, f"add_{kind}")(data, **kw)


def run_widget(qtbot, widget: RegisterWidget, **kw) -> list[str]:
    """Run and wait; returns the status line after each progress step and after the result."""
    shown: list[str] = []
    handlers = {name: getattr(widget, name) for name in ("_on_progress", "_on_returned")}
    for name, handler in handlers.items():  # (a Label emits no signal when set)
        setattr(widget, name, lambda x, handler=handler: (handler(x), shown.append(widget.status.value)))
    widget.run(**kw)
    assert widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    for name, handler in handlers.items():
        setattr(widget, name, handler)
    return shown


def look(viewer) -> list[tuple]:
    """What the user sees of each layer: name, visibility and style."""
    return [(layer.name, layer.visible, layer.opacity, str(layer.blending),
             getattr(getattr(layer, "colormap", None), "name", None)) for layer in viewer.layers]


def assert_placed_like(layer, reference) -> None:
    np.testing.assert_allclose(layer.scale, reference.scale)
    np.testing.assert_allclose(layer.translate, reference.translate)
    np.testing.assert_allclose(layer.affine.affine_matrix, reference.affine.affine_matrix)


@pytest.fixture
def viewer_widgets(make_napari_viewer):
    viewer = make_napari_viewer()
    reg, qa_w = RegisterWidget(viewer), QAWidget(viewer)
    viewer.window.add_dock_widget(reg)
    viewer.window.add_dock_widget(qa_w)
    return viewer, reg, qa_w


@pytest.fixture
def histology(viewer_widgets):
    """4x downsampled histology pair + the full-resolution landmarks (so layers differ in scale)."""
    from napari_register.points import read_points

    viewer, reg, qa_w = viewer_widgets
    d = sample_dir() / "histology"
    for role in ("fixed", "moving"):
        add(viewer, downsample(read_image(d / f"{role}.jpg"), 4), role)
    for role in ("fixed", "moving"):
        img = read_image(d / f"{role}.jpg")
        data, kw, _ = L.points_layer(read_points(d / f"{role}_points.csv", 2), img.geometry, f"{role}_points")
        viewer.add_points(data, **kw)
    reg.method_options = FAST_2D
    return viewer, reg, qa_w


@pytest.fixture
def brain_layers(viewer_widgets):
    """The brain pair (6x downsampled) beside whatever else is open, for the 3D pickers."""
    viewer = viewer_widgets[0]
    for role in ("fixed", "moving"):
        add(viewer, downsample(read_image(sample_dir() / "brain" / f"{role}.nii.gz"), 6), f"brain_{role}")


@pytest.fixture
def brain(viewer_widgets):
    """3x downsampled brain pair and label maps (non-identity direction: layers carry an affine)."""
    viewer, reg, qa_w = viewer_widgets
    d = sample_dir() / "brain"
    for role in ("fixed", "moving"):
        add(viewer, downsample(read_image(d / f"{role}.nii.gz"), 3), role)
    for role in ("fixed", "moving"):
        add(viewer, downsample(read_image(d / f"{role}_seg.nii.gz", labels=True), 3), f"{role}_seg", "labels")
    reg.method_options = FAST_3D
    return viewer, reg, qa_w


# ---------------------------------------------------------------------------------------- plugin

def test_manifest_validates_and_is_discovered():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-register")
    import napari_register

    # the shipped file itself validates (from_file raises on any schema error)
    assert npe2.PluginManifest.from_file(Path(napari_register.__file__).parent / "napari.yaml").name == manifest.name
    assert {w.display_name for w in manifest.contributions.widgets} == {"Register", "Registration QA"}
    assert {s.display_name for s in manifest.contributions.sample_data} == {"Brain pair (3D)", "Histology pair (2D)"}
    assert "*.nii.gz" in manifest.contributions.readers[0].filename_patterns
    import importlib

    for command in manifest.contributions.commands:  # every lazy python_name resolves
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_samples_open(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-register", "brain")
    assert [layer.name for layer in viewer.layers] == ["fixed", "moving", "fixed_seg", "moving_seg"]
    assert type(viewer.layers["fixed_seg"]).__name__ == "Labels"
    assert set(np.unique(viewer.layers["fixed_seg"].data)) == {0, 1, 2}
    assert_placed_like(viewer.layers["fixed_seg"], viewer.layers["fixed"])
    # the NIfTI's LPS direction (-1, -1, 1) is in the layer's affine
    np.testing.assert_allclose(np.diag(viewer.layers["fixed"].affine.affine_matrix), [1, -1, -1, 1])
    viewer.layers.clear()
    viewer.open_sample("napari-register", "histology")
    names = [layer.name for layer in viewer.layers]
    assert names == ["fixed", "moving", "fixed_points", "moving_points"]
    assert viewer.layers["fixed"].rgb and len(viewer.layers["fixed_points"].data) > 5


def test_reader_declines_and_opens_nifti_with_scale(make_napari_viewer, tmp_path):
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder without DICOM
    assert get_reader(str(tmp_path / "missing.nii.gz")) is None
    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    geom = Geometry((5, 6, 7), (0.5, 2.0, 3.0), (10.0, -4.0, 1.5), np.eye(3))
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    write_image(Image(arr, geom), tmp_path / "vol.nii.gz")
    write_image(Image((arr > 100).astype(np.uint8), geom), tmp_path / "vol_seg.nii.gz")
    assert get_reader(str(tmp_path / "vol.nii.gz")) is not None
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "vol.nii.gz"), plugin="napari-register")
    np.testing.assert_allclose(layer.scale, [3.0, 2.0, 0.5])
    np.testing.assert_allclose(layer.translate, [1.5, -4.0, 10.0])
    np.testing.assert_array_equal(layer.data, arr)
    (seg,) = viewer.open(str(tmp_path / "vol_seg.nii.gz"), plugin="napari-register")
    assert type(seg).__name__ == "Labels"


def test_layer_geometry_roundtrip_and_writer(make_napari_viewer, tmp_path):
    from napari_register._napari.writer import write_layer

    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    geom = Geometry((4, 5, 6), (0.7, 1.1, 2.5), (3.0, -2.0, 8.0), rot)
    viewer = make_napari_viewer()
    layer = add(viewer, Image(np.random.rand(4, 5, 6).astype(np.float32), geom), "rotated")
    back = L.geometry_from_layer(layer)
    np.testing.assert_allclose(back.spacing, geom.spacing)
    np.testing.assert_allclose(back.origin, geom.origin)
    np.testing.assert_allclose(back.direction, geom.direction, atol=1e-12)
    # napari's world position of a voxel is its physical point, reversed to (z, y, x)
    vox = np.array([1.0, 2.0, 3.0])
    phys = (geom.phys_from_vox() @ np.r_[vox, 1])[:3]
    np.testing.assert_allclose(layer.data_to_world(vox), phys[::-1])
    data, meta, _ = layer.as_layer_data_tuple()
    (path,) = write_layer(str(tmp_path / "out.mha"), data, meta)
    img = read_image(path)
    np.testing.assert_allclose(img.geometry.spacing, geom.spacing, rtol=1e-6)
    np.testing.assert_allclose(img.geometry.direction, geom.direction, atol=1e-6)


# ---------------------------------------------------------------------------------------- widget

def test_register_2d_adds_layers_in_fixed_frame_and_improves_tre(histology, qtbot, tmp_path):
    viewer, reg, qa_w = histology
    assert reg.moving.value.name == "moving" and reg.fixed.value.name == "fixed"
    assert reg.moving_points.value.name == "moving_points"
    assert reg.method.value == "optimize" and reg.checkpoint.value is None
    cuda_item = reg.device.native.model().item(2)
    import torch

    assert cuda_item.isEnabled() == torch.cuda.is_available()
    before = {layer.name: np.array(layer.data, copy=True) for layer in viewer.layers}
    fixed_pts, moving_pts = L.points_phys(viewer.layers["fixed_points"]), L.points_phys(viewer.layers["moving_points"])
    tre_before = metrics.tre(fixed_pts, moving_pts)["mean"]

    run_widget(qtbot, reg)
    (run,) = reg.session.runs
    assert set(run.layers) == {"warped", "points", "grid", "jacobian", "magnitude"}
    for role in ("warped", "grid", "jacobian", "magnitude", "points"):
        assert_placed_like(run.layers[role], viewer.layers["fixed"])
    assert run.layers["warped"].rgb and run.layers["warped"].data.shape == viewer.layers["fixed"].data.shape
    for name, data in before.items():  # nothing the user opened changed
        np.testing.assert_array_equal(viewer.layers[name].data, data)
    assert not any("preview" in layer.name for layer in viewer.layers)
    # QA picked the run's warped points and measured TRE against the fixed landmarks
    assert qa_w.points_a.value is viewer.layers["fixed_points"] and qa_w.points_b.value is run.layers["points"]
    expected = metrics.tre(fixed_pts, run.result.map_points_inverse(moving_pts))
    assert run.tre == pytest.approx((expected["mean"], expected["max"]), rel=1e-6)
    assert run.tre[0] < 0.9 * tre_before, (run.tre, tre_before)

    # QA views land on the fixed grid; grid spacing redraws the run's grid
    for view in ("checkerboard", "difference", "blend"):
        qa_w.view.value = view
        qa_w.show_view()
        assert_placed_like(viewer.layers[f"QA {view}"], viewer.layers["fixed"])
    assert not run.layers["grid"].visible and not run.layers["grid"].data.any()  # drawn when shown
    run.layers["grid"].visible = True
    grid_before = run.layers["grid"].data.mean()
    assert grid_before > 0
    qa_w.grid_spacing.value = 32
    assert run.layers["grid"].data.mean() < 0.8 * grid_before
    # the field writer saves the run's displacement as an ITK transform; other layers are refused
    import SimpleITK as sitk

    from napari_register._napari.writer import write_field

    data, meta, _ = run.layers["jacobian"].as_layer_data_tuple()
    (h5,) = write_field(str(tmp_path / "field.h5"), data, meta)
    assert sitk.ReadTransform(h5).GetDimension() == 2
    with pytest.raises(ValueError, match="not a registration result"):
        write_field(str(tmp_path / "x.h5"), *viewer.layers["fixed"].as_layer_data_tuple()[:2])
    csv_path = qa_w.save_csv(tmp_path / "runs.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("run,method") and lines[1].startswith("#1,optimize")


def test_register_3d_improves_dice_then_instance_optimisation(brain, qtbot):
    viewer, reg, qa_w = brain
    assert reg.moving_labels.value.name == "moving_seg"
    fixed_seg, moving_seg = viewer.layers["fixed_seg"].data, viewer.layers["moving_seg"].data
    dice_before = np.nanmean(list(metrics.dice(fixed_seg, moving_seg).values()))

    statuses = run_widget(qtbot, reg)
    (run,) = reg.session.runs
    assert set(run.layers) == {"warped", "labels", "grid", "jacobian", "magnitude"}
    # the status went: estimate, the stages with [k/n], share done and time left, then the result
    estimate = next(i for i, text in enumerate(statuses) if text.startswith("estimated time: about"))
    stage = next(i for i, text in enumerate(statuses) if text.startswith("[") and "% " in text)
    assert estimate < stage < len(statuses) - 1, statuses
    assert "left" in statuses[stage] and statuses[estimate] in statuses[stage]  # the estimate stays in view
    assert "registration" in reg.status.value
    assert reg.progress.value == 100
    # the result view: fixed green, warped magenta over it (added: grey where they agree), the moving
    # hidden (not removed), labels as contours, grid, Jacobian and magnitude hidden
    fixed, moving, warped = viewer.layers["fixed"], viewer.layers["moving"], run.layers["warped"]
    assert fixed.visible and fixed.colormap.name == "green"
    assert warped.visible and warped.colormap.name == "magenta" and str(warped.blending) == "additive"
    assert viewer.layers.selection.active is warped
    assert viewer.layers.index(warped) > viewer.layers.index(fixed)  # over it
    assert not moving.visible and moving.colormap.name == warped.colormap.name  # "before" looks alike
    assert run.layers["labels"].visible and run.layers["labels"].contour > 0
    assert not any(run.layers[role].visible for role in ("grid", "jacobian", "magnitude"))
    # the before/after toggle swaps the moving image in for the result, and back
    assert reg.before.enabled and not reg.before.value
    reg.before.value = True
    assert moving.visible and not warped.visible and not run.layers["labels"].visible
    reg.before.value = False
    assert not moving.visible and warped.visible and run.layers["labels"].visible
    # hidden layers are drawn when first shown
    run.layers["magnitude"].visible = True
    np.testing.assert_allclose(run.layers["magnitude"].data, run.result.field.magnitude())
    for layer in run.layers.values():
        assert_placed_like(layer, viewer.layers["fixed"])
    fixed_img, moving_img = viewer.layers["fixed"].data, viewer.layers["moving"].data
    assert metrics.ncc(fixed_img, run.layers["warped"].data) > metrics.ncc(fixed_img, moving_img) + 0.01
    warped_seg = run.layers["labels"].data
    assert set(np.unique(warped_seg)) <= {0, 1, 2}
    dice = metrics.dice(fixed_seg, warped_seg)
    assert run.dice == pytest.approx(np.nanmean(list(dice.values())), rel=1e-9)  # QA == metrics.dice
    assert run.dice > dice_before + 0.005, (run.dice, dice_before)
    assert run.result.fold_fraction == metrics.fold_fraction(run.layers["jacobian"].data)
    # rolling the axes redraws the grid with the lines of the plane now on screen
    from napari_register._napari.result_view import grid_array

    run.layers["grid"].visible = True
    np.testing.assert_array_equal(run.layers["grid"].data, grid_array(run.result, run.grid_spacing, (1, 2)))
    viewer.dims.order = (1, 0, 2)
    np.testing.assert_array_equal(run.layers["grid"].data, grid_array(run.result, run.grid_spacing, (0, 2)))
    viewer.dims.order = (0, 1, 2)

    # "Instance optimisation" continues run 1 on the same pair: a second run, parent 1
    reg.io_steps.value = 10
    assert reg.io_button.enabled
    run_widget(qtbot, reg, continue_run=True)
    assert [r.number for r in reg.session.runs] == [1, 2]
    second = reg.session.runs[1]
    assert second.parent == 1 and second.result.io_steps == 10
    assert second.layers["warped"].name == "optimize #2 warped"
    assert second.layers["warped"].visible and not run.layers["warped"].visible  # the newest result on top
    assert qa_w.table.data.to_list()[1][0] == "#2 (from #1)"


def test_carl_offered_for_2d_and_3d_and_instance_optimisation_updates_live(histology, brain_layers, qtbot,
                                                                          monkeypatch, tmp_path):
    import torch

    from napari_register import weights

    viewer, reg, _ = histology
    reg.method.value = "carl"
    shipped_2d = str(weights.CHECKPOINT_DIR / "carl-2d.pt")
    assert reg.checkpoint.choices[0] == shipped_2d  # the shipped checkpoint first, "from file..." offered
    reg.checkpoint.value = shipped_2d
    assert list(reg.settings.choices) == ["default"]  # the brain settings are for 3D
    from napari_register.methods.registry import get_method

    carl = get_method("carl")
    reg.device.value = "cpu"
    assert reg.io_steps.value == carl.io_steps_default(torch.device("cpu")) == 0  # minutes on the CPU
    if torch.cuda.is_available():
        reg.device.value = "cuda"
        assert reg.io_steps.value == carl.io_steps_default(torch.device("cuda")) == 50
        reg.device.value = "cpu"
    reg.io_steps.value = 0
    reg.method_options = {"affine_iterations": 20}
    shipped = weights.sha256(weights.CHECKPOINT_DIR / "carl-2d.pt")
    run_widget(qtbot, reg)
    (first,) = reg.session.runs
    assert first.layers["warped"].name == "carl #1 warped" and first.result.checkpoint == "carl-2d"
    for role in ("warped", "grid", "jacobian", "magnitude"):
        assert_placed_like(first.layers[role], viewer.layers["fixed"])

    seen: list[tuple[str, bool]] = []
    on_progress = reg._on_progress

    def record(p):  # what the user sees while instance optimisation runs
        on_progress(p)
        seen.append((p.stage, any("preview" in layer.name for layer in viewer.layers)))
    reg._on_progress = record
    reg.io_steps.value = 10
    run_widget(qtbot, reg, continue_run=True)
    second = reg.session.runs[1]
    assert second.parent == 1 and second.result.io_steps == 10 and second.result.method == "carl"
    assert [s for s, _ in seen].count("instance optimisation") == 10
    assert any(shown for s, shown in seen if s == "instance optimisation"), "no live preview during IO"
    assert not any("preview" in layer.name for layer in viewer.layers)
    assert not np.array_equal(second.layers["warped"].data, first.layers["warped"].data)
    assert weights.sha256(weights.CHECKPOINT_DIR / "carl-2d.pt") == shipped  # the shipped model is untouched

    # a 3D pair gets CARL with its 3D checkpoint
    reg.moving.value, reg.fixed.value = viewer.layers["brain_moving"], viewer.layers["brain_fixed"]
    assert "carl" in reg.method.choices
    reg.method.value = "carl"
    assert reg.checkpoint.value == str(weights.CHECKPOINT_DIR / "carl-3d.pt")
    # CARL offers its brain settings; they (and script-set options over them) reach the job
    from napari_register.methods.carl import BRAIN_SETTINGS
    assert list(reg.settings.choices) == ["default", "brain"] and not reg.settings.native.isHidden()
    reg.method_options = None
    assert reg._job_arguments(None)["options"] is None  # "default": the method's defaults
    reg.settings.value = "brain"
    assert reg._job_arguments(None)["options"] == BRAIN_SETTINGS
    reg.method_options = {"passes": 2}
    assert reg._job_arguments(None)["options"] == {**BRAIN_SETTINGS, "passes": 2}
    reg.method.value = "optimize"
    assert list(reg.settings.choices) == ["default"] and reg.settings.native.isHidden()
    reg.method.value = "carl"
    # in the order a fresh widget shows them: shipped first, "from file..." last
    assert list(reg.checkpoint.choices) == [str(weights.CHECKPOINT_DIR / "carl-3d.pt"), "from file..."]
    # a checkpoint picked from a file joins the list before "from file..." and is selected
    from qtpy.QtWidgets import QFileDialog
    mine = str(tmp_path / "mine.pt")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (mine, "")))
    reg.checkpoint.value = "from file..."
    assert list(reg.checkpoint.choices) == [str(weights.CHECKPOINT_DIR / "carl-3d.pt"), mine, "from file..."]
    assert reg.checkpoint.value == mine


def test_ran_offered_for_2d_and_3d_with_its_checkpoints_and_runs_in_the_viewer(histology, brain_layers, qtbot):
    from napari_register import weights

    for dim in (2, 3):
        if not (weights.CHECKPOINT_DIR / f"ran-{dim}d.pt").exists():
            pytest.skip(f"ran-{dim}d.pt not shipped")
    viewer, reg, _ = histology
    assert "ran" in reg.method.choices
    reg.method.value = "ran"
    shipped_2d = str(weights.CHECKPOINT_DIR / "ran-2d.pt")
    assert reg.checkpoint.value == shipped_2d and reg.io_steps.value == 0
    reg.method_options = {"affine_iterations": 0}
    run_widget(qtbot, reg)
    (first,) = reg.session.runs
    assert first.layers["warped"].name == "ran #1 warped" and first.result.checkpoint == "ran-2d"
    for role in ("warped", "grid", "jacobian"):
        assert_placed_like(first.layers[role], viewer.layers["fixed"])
    # the network alone on a cross-stain pair may match worse than its start; then the start is kept, and said
    kept = first.result.quality["kept"]
    assert kept == "result" or any("worse than its start" in n for n in first.result.notes)
    assert (kept == "start") == np.array_equal(first.layers["warped"].data, viewer.layers["moving"].data)
    reg.io_steps.value = 2
    run_widget(qtbot, reg, continue_run=True)
    assert reg.session.runs[1].result.io_steps == 2 and reg.session.runs[1].result.method == "ran"

    # a 3D pair gets RAN with its 3D checkpoint; the 2D landmarks picked before are no longer offered
    reg.moving_points.value = viewer.layers["moving_points"]
    reg.moving.value, reg.fixed.value = viewer.layers["brain_moving"], viewer.layers["brain_fixed"]
    assert reg.moving_points.value is None and viewer.layers["moving_points"] not in reg.moving_points.choices
    reg.fixed.value = viewer.layers["fixed"]  # back to the 2D pair: offered again
    assert viewer.layers["moving_points"] in reg.moving_points.choices
    reg.fixed.value = viewer.layers["brain_fixed"]
    assert "ran" in reg.method.choices
    reg.method.value = "ran"
    assert reg.checkpoint.value == str(weights.CHECKPOINT_DIR / "ran-3d.pt")
    run_widget(qtbot, reg)
    third = reg.session.runs[-1]
    assert third.result.checkpoint == "ran-3d" and third.result.warped.ndim == 3


def test_cancel_leaves_no_half_made_layers(brain, qtbot):
    viewer, reg, _ = brain
    reg.method_options = {"levels": [2], "iterations": [5000]}  # would run for minutes
    names, seen = [layer.name for layer in viewer.layers], look(viewer)
    steps: list[int] = []
    on_progress = reg._on_progress

    def record(p):
        steps.append(p.step)
        on_progress(p)
    reg._on_progress = record
    reg.run()
    qtbot.waitUntil(lambda: " 12/5000" in reg.status.value, timeout=WAIT_MS)  # past the first preview
    assert any("preview" in layer.name for layer in viewer.layers) and reg.progress.value > 0
    reg.cancel_button.clicked.emit()
    qtbot.waitUntil(lambda: not reg.running, timeout=60_000)
    # cancel is polled at every step: the run stops long before its 5000 steps (counted in steps,
    # not seconds, so a loaded machine cannot fail it)
    assert max(steps) < 1000
    assert [layer.name for layer in viewer.layers] == names and look(viewer) == seen  # nothing restyled
    assert reg.session.runs == [] and "cancelled" in reg.status.value
    assert reg.run_button.enabled and reg.progress.value == 0 and not reg.before.enabled


def test_error_becomes_notification_and_widget_lives(brain, qtbot, monkeypatch):
    viewer, reg, _ = brain
    shown = []
    monkeypatch.setattr("napari_register._napari.widgets.show_error", shown.append)
    reg.method_options = {"no_such_option": 1}
    run_widget(qtbot, reg)
    assert shown and "no_such_option" in shown[0]
    assert reg.run_button.enabled and reg.session.runs == []


def test_bad_input_is_a_notification_and_the_viewer_is_unchanged(viewer_widgets, qtbot, monkeypatch, tmp_path):
    """A bad image, then a checkpoint carrying code: each a notification naming the problem, no layer
    added or changed, the widget ready again; a run that had to work coarser says so."""
    import torch

    from corpus_files import PAYLOAD_MARKER, Payload, checkpoint_blob, volume
    from napari_register import resources

    viewer, reg, _ = viewer_widgets
    errors, infos = [], []
    monkeypatch.setattr("napari_register._napari.widgets.show_error", errors.append)
    monkeypatch.setattr("napari_register._napari.widgets.show_info", infos.append)
    holes = volume((32, 32))
    holes[4:6, 4:6] = np.nan
    fixed = add(viewer, Image(holes, Geometry.default((32, 32))), "fixed")
    add(viewer, Image(volume((32, 32), shift=2), Geometry.default((32, 32))), "moving")
    reg.method_options = {"levels": [2, 1], "iterations": [3, 3], "affine_iterations": 2}
    before = [(layer.name, np.array(layer.data, copy=True)) for layer in viewer.layers]
    seen = look(viewer)

    def unchanged() -> None:
        assert [layer.name for layer in viewer.layers] == [name for name, _ in before] and look(viewer) == seen
        assert reg.progress.value == 0
        for (_, data), layer in zip(before, viewer.layers):
            np.testing.assert_array_equal(layer.data, data)
        assert reg.run_button.enabled and not reg.cancel_button.enabled and reg.session.runs == []

    run_widget(qtbot, reg)
    assert len(errors) == 1 and "fixed image" in errors[0] and "NaN" in errors[0], errors
    unchanged()

    fixed.data = np.nan_to_num(fixed.data)
    before[0] = ("fixed", np.array(fixed.data, copy=True))
    evil = tmp_path / "evil.pt"
    torch.save({**checkpoint_blob(), "card": {"x": Payload(tmp_path / PAYLOAD_MARKER)}}, evil)
    reg.method.value = "carl"
    reg._extra_checkpoints.append(str(evil))
    reg._refresh_checkpoints()
    reg.checkpoint.value = str(evil)
    reg.io_steps.value = 0
    reg.method_options = {"affine_iterations": 2}
    run_widget(qtbot, reg)
    assert len(errors) == 2 and "not a plain weights file" in errors[1] and "evil.pt" in errors[1], errors
    assert not (tmp_path / PAYLOAD_MARKER).exists()
    unchanged()

    reg.method.value = "optimize"
    reg.method_options = {"levels": [1], "iterations": [2], "affine_iterations": 0}
    monkeypatch.setattr(resources, "OVERHEAD", 0)
    monkeypatch.setattr(resources, "available", lambda device: 290 * 32 * 32)  # the full grid needs 330 B/px
    run_widget(qtbot, reg)
    assert len(reg.session.runs) == 1 and any("working at" in text for text in infos), infos


def test_dimension_mismatch_is_a_clear_message(make_napari_viewer):
    viewer = make_napari_viewer()
    reg = RegisterWidget(viewer)
    viewer.add_image(np.random.rand(8, 9, 10), name="fixed volume")
    viewer.add_image(np.random.rand(9, 10), name="moving photo")
    reg.fixed.value, reg.moving.value = viewer.layers["fixed volume"], viewer.layers["moving photo"]
    assert "2D" in reg.status.value and "3D" in reg.status.value
    assert not reg.run_button.enabled


def test_qt_binding_keeps_refcounts(qapp):
    """PySide6 6.12.0 on Python 3.11 drops a reference to None on every void Qt call; napari then
    dies at exit with 'none_dealloc'. Fail here, with the fix, instead of crashing the whole run."""
    import sys

    from qtpy.QtWidgets import QLabel

    label = QLabel()
    before = sys.getrefcount(None)
    for _ in range(2000):
        label.setText("x")
    assert abs(sys.getrefcount(None) - before) < 500, (
        "the Qt binding leaks references to None (PySide6-Essentials 6.12.0 on Python < 3.12); "
        "install PySide6-Essentials<6.12, e.g. pip install 'PySide6-Essentials==6.11.3'")



def test_homography_first_then_deformable_from_the_widget(viewer_widgets, qtbot, tmp_path):
    """A matrix run (AltO with its shipped checkpoint and corner fit) is offered as the pre-alignment
    of the next run on the same pair, and that run starts from it."""
    from napari_register import weights
    from napari_register.transforms import MatrixTransform, warp_image

    viewer, reg, _ = viewer_widgets
    full = read_image(sample_dir() / "histology" / "fixed.jpg")
    arr = np.ascontiguousarray(full.luminance()[::4, ::4])
    fixed = Image(arr, Geometry.default(arr.shape))
    c = np.array(arr.shape[::-1]) / 2
    H = np.array([[1.04, 0.05, 0.0], [-0.03, 0.97, 0.0], [0.0, 0.0, 1.0]])
    H[:2, 2] = c + [9.0, -6.0] - H[:2, :2] @ c
    moving = warp_image(fixed, MatrixTransform(np.linalg.inv(H)), fixed.geometry)
    add(viewer, fixed, "fixed")
    add(viewer, moving, "moving")
    add(viewer, downsample(fixed, 2), "other")  # another pair's image: its runs are not offered
    offered = (lambda: [c for c in reg.prealign.choices if c is not None])  # noqa: E731
    assert reg.prealign.value is None and offered() == [] and reg.prealign.native.isHidden()

    reg.method.value = "alto"  # the shipped checkpoint, chosen by default
    assert reg.checkpoint.value == str(weights.CHECKPOINT_DIR / "alto-2d.pt")
    reg.method_options, reg.io_steps.value = None, 80  # the corner fit
    run_widget(qtbot, reg)
    alto = reg.session.runs[-1]
    assert alto.result.transform.as_matrix() is not None
    assert offered() == [alto] and not reg.prealign.native.isHidden()

    reg.method.value = "optimize"
    reg.method_options = {"levels": [4], "iterations": [1], "affine_iterations": 0}  # adds (almost) nothing
    reg.prealign.value = alto
    run_widget(qtbot, reg)
    seeded = reg.session.runs[-1]
    assert seeded.result.method == "optimize" and seeded.result.prealign is not None
    np.testing.assert_allclose(seeded.result.prealign.matrix, alto.result.transform.as_matrix())
    pts = np.array([[40.0, 60.0], [150.0, 180.0], [200.0, 60.0]])
    assert np.abs(alto.result.map_points(pts) - pts).max() > 3  # the matrix moves: the check below means something
    assert np.abs(seeded.result.map_points(pts) - alto.result.map_points(pts)).max() < 1.5
    assert offered() == [alto]  # a dense result is no pre-alignment

    # the plugin's homography writer: the matrix run's 3x3 text, and a clear refusal for a dense run
    from napari_register._napari.writer import write_homography

    meta = (lambda layer: {"name": layer.name, "metadata": layer.metadata})  # noqa: E731
    out = write_homography(str(tmp_path / "h.txt"), None, meta(alto.layers["warped"]))
    np.testing.assert_allclose(np.loadtxt(out[0]), alto.result.transform.as_matrix())
    with pytest.raises(ValueError, match="has no homography"):
        write_homography(str(tmp_path / "d.txt"), None, meta(seeded.layers["grid"]))
    reg.fixed.value = viewer.layers["other"]
    assert offered() == [] and reg.prealign.value is None and reg.prealign.native.isHidden()


def test_art_registers_a_colour_pair_and_exports_its_homography(viewer_widgets, qtbot, tmp_path):
    """ART on an RGB pair related by a homography: the warped layer stays in colour, grid and
    Jacobian layers sit on the fixed image, the fitted homography moves points towards the truth,
    is offered as a pre-alignment and is saved by the plugin's writer."""
    from napari_register import weights
    from napari_register._napari.writer import write_homography
    from napari_register.transforms import MatrixTransform, warp_image

    if not (weights.CHECKPOINT_DIR / "art-2d.pt").exists():
        pytest.skip("art-2d.pt not shipped")
    viewer, reg, _ = viewer_widgets
    fixed = downsample(read_image(sample_dir() / "histology" / "fixed.jpg"), 4)
    fixed = Image(fixed.array, Geometry.default(fixed.array.shape[:2]), channels=True, rgb=True)
    h, w = fixed.array.shape[:2]
    c = np.array([w, h]) / 2
    H = np.array([[1.05, 0.04, 0.0], [-0.04, 0.98, 0.0], [2e-5, -3e-5, 1.0]])  # fixed px -> moving px (x, y)
    H[:2, 2] = c + [8.0, -5.0] - H[:2, :2] @ c
    moving = warp_image(fixed, MatrixTransform(np.linalg.inv(H)), fixed.geometry)
    assert moving.rgb
    add(viewer, fixed, "fixed")
    add(viewer, moving, "moving")
    assert "art" in reg.method.choices
    reg.method.value = "art"
    assert reg.checkpoint.value == str(weights.CHECKPOINT_DIR / "art-2d.pt")
    reg.method_options = None
    run_widget(qtbot, reg)
    (run,) = reg.session.runs
    assert run.layers["warped"].rgb and run.result.warped.rgb
    for role in ("warped", "grid", "jacobian"):
        assert_placed_like(run.layers[role], viewer.layers["fixed"])
    pts = np.array([[0.25 * w, 0.25 * h], [0.75 * w, 0.3 * h], [0.7 * w, 0.75 * h], [0.3 * w, 0.7 * h]])
    truth = (np.c_[pts, np.ones(4)] @ H.T)[:, :2] / (np.c_[pts, np.ones(4)] @ H.T)[:, 2:]
    before = np.linalg.norm(pts - truth, axis=1).mean()
    after = np.linalg.norm(run.result.homography.moving_from_fixed(pts) - truth, axis=1).mean()
    assert after < 0.5 * before, (before, after)
    assert [c for c in reg.prealign.choices if c is not None] == [run]  # the fitted homography seeds a next run

    layer = run.layers["warped"]
    out = write_homography(str(tmp_path / "h.txt"), layer.data, {"name": layer.name, "metadata": layer.metadata})
    np.testing.assert_allclose(np.loadtxt(out[0]), run.result.homography.as_matrix())
    with pytest.raises(ValueError, match="not a registration result"):
        write_homography(str(tmp_path / "x.txt"), None, {"name": "fixed", "metadata": {}})
