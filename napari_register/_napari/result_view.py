"""A run's result layers and how they look in the viewer, so that the run can be judged at a glance.

The fixed image in green with the warped image over it in magenta, added: where they agree the sum is
grey, where they do not it shows green or magenta fringes. (A grey fixed image under a coloured one
tints the whole brain pink or green, aligned or not: compared on the brain sample, only the
complementary pair reads at a glance.) The unregistered moving image is hidden and styled like the
warped one (the before/after toggle swaps it in), warped labels are contours, the deformation grid and
the Jacobian are hidden. Only a finished run restyles the viewer: a cancelled or failed one
leaves it exactly as it was. The grid and the displacement magnitude are drawn when their layers are
first shown (1.5 s and 0.5 s on the brain pair, for layers most runs never show).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .. import qa
from ..api import RegistrationResult
from ..image import Image
from .layers import LayerData, image_layer, points_layer, run_metadata
from .session import Run, RunProducts

# complementary colours, added: agreement is grey; RGB photos take no colormap, so half transparent
FIXED_COLORMAP = "green"
OVERLAY = {"colormap": "magenta", "blending": "additive"}
RGB_OVERLAY = {"opacity": 0.5, "blending": "translucent"}
GRID_STYLE = {"colormap": "yellow", "blending": "additive", "contrast_limits": (0, 1), "opacity": 0.6,
              "visible": False}
LABEL_CONTOUR = 1  # pixels; filled labels would hide the images they are judged against
AFTER_ROLES = ("warped", "labels", "points")  # the result layers "before" hides


def overlay_style(rgb: bool) -> dict[str, Any]:
    """Layer keywords of an image shown over the fixed one (the warped, and the moving for "before")."""
    return dict(RGB_OVERLAY if rgb else OVERLAY)


def displayed_axes(viewer: Any, ndim: int) -> tuple[int, ...]:
    """Array axes of an ``ndim``-D layer shown on screen (the last two of the viewer's dims order)."""
    offset = viewer.dims.ndim - ndim
    axes = [a - offset for a in viewer.dims.order[-2:] if a - offset >= 0]
    return tuple(sorted(axes)) if len(axes) == 2 else tuple(range(ndim))[-2:]


def grid_array(result: RegistrationResult, spacing: float, axes: Sequence[int]) -> np.ndarray:
    """Deformation grid on the fixed grid: lines of the given array ``axes`` (the displayed plane),
    so every slice of a 3D volume shows its own in-plane grid -> float32 0/1 of the fixed shape."""
    return qa.grid_image(result.field.disp_vox(), spacing, axes=tuple(axes))


def result_layers(run: Run, products: RunProducts, points_style: Optional[dict] = None) -> dict[str, LayerData]:
    """Role -> layer-data tuple for every result layer, all placed on the fixed image's grid; the grid
    and the magnitude hold no data until shown (:func:`show_result`)."""
    r = products.result
    meta = (lambda role: {"metadata": run_metadata(run.number, role, r.field, r.matrix)})
    name = run.name
    geom = r.fixed.geometry
    out = {"warped": image_layer(r.warped, f"{name} warped", **overlay_style(r.warped.rgb), **meta("warped"))}
    if products.warped_labels is not None:  # drawn as contours once added (show_result)
        out["labels"] = image_layer(products.warped_labels, f"{name} warped labels", "labels", **meta("labels"))
    if products.warped_points is not None:
        out["points"] = points_layer(products.warped_points, geom, f"{name} warped points",
                                     **(points_style or {}), **meta("points"))
    # no lines yet: drawn when shown (draw_grid)
    out["grid"] = image_layer(Image(np.zeros(geom.shape, np.float32), geom), f"{name} grid", **GRID_STYLE,
                              **meta("grid"))
    cm = qa.jacobian_colormap(0.0, 2.0)
    out["jacobian"] = image_layer(r.jacobian, f"{name} Jacobian", visible=False, opacity=0.7,
                                  colormap=_napari_colormap(cm), contrast_limits=cm["contrast_limits"],
                                  **meta("jacobian"))
    out["magnitude"] = image_layer(Image(np.zeros(geom.shape, np.float32), geom), f"{name} |displacement|",
                                   colormap="inferno", visible=False, **meta("magnitude"))  # filled when shown
    return out


def _napari_colormap(cm: dict) -> Any:
    from napari.utils import Colormap

    # qa's piecewise colours: blue (shrink) -> white at det 1 -> red (grow), and a green band for det <= 0
    return Colormap(colors=cm["colors"], controls=cm["controls"], name="jacobian (fold = green)")


def _alive(viewer: Any, layer: Any) -> bool:
    return layer is not None and layer in viewer.layers


def draw_grid(viewer: Any, run: Run, spacing: Optional[float] = None) -> None:
    """(Re)draw ``run``'s grid with the lines of the plane on screen, every ``spacing`` voxels (None:
    the run's). A hidden grid is only marked stale: it is drawn when shown."""
    if spacing is not None:
        run.grid_spacing = float(spacing)
    layer = run.layers.get("grid")
    if not _alive(viewer, layer):
        return
    if not layer.visible:
        run.grid_stale = True
        return
    layer.data = grid_array(run.result, run.grid_spacing, displayed_axes(viewer, layer.ndim))
    run.grid_stale = False


def show_result(viewer: Any, run: Run, earlier: Iterable[Run] = ()) -> None:
    """Restyle the viewer for a run whose layers were just added: the fixed image green and shown, the
    moving one hidden and styled like the warped one, labels as contours, the ``earlier`` runs of the
    same fixed image hidden (their overlays would cover this one's), the warped layer selected (its
    controls in view)."""
    for other in earlier:
        if other.fixed_layer is run.fixed_layer:
            for layer in other.layers.values():
                if _alive(viewer, layer):
                    layer.visible = False
    fixed, moving = run.fixed_layer, run.moving_layer
    if _alive(viewer, fixed):
        if not fixed.rgb:
            fixed.colormap = FIXED_COLORMAP
        fixed.visible = True
    if _alive(viewer, moving):
        for key, value in overlay_style(moving.rgb).items():
            setattr(moving, key, value)
        moving.visible = False
    labels = run.layers.get("labels")
    if labels is not None:
        labels.contour = LABEL_CONTOUR
    if _alive(viewer, run.layers.get("warped")):
        viewer.layers.selection.active = run.layers["warped"]
    magnitude = run.layers.get("magnitude")
    drawn: list[str] = []  # the magnitude once computed (the grid is redrawn whenever stale)

    def draw_magnitude() -> None:
        if not drawn:
            magnitude.data = run.result.field.magnitude()
            magnitude.reset_contrast_limits()
            drawn.append("magnitude")
    when_shown(run.layers.get("grid"), lambda: run.grid_stale and draw_grid(viewer, run))
    when_shown(magnitude, draw_magnitude)


def when_shown(layer: Any, draw: Callable[[], Any]) -> None:
    """Call ``draw`` whenever ``layer`` is made visible (a hidden layer whose data is made on demand)."""
    def on_visible(_event: Any = None) -> None:
        if layer.visible:
            draw()
    if layer is not None:
        layer.events.visible.connect(on_visible)


def show_before(viewer: Any, run: Run, before: bool) -> None:
    """The before/after toggle: the unregistered moving image over the fixed one, or the result."""
    if _alive(viewer, run.moving_layer):
        run.moving_layer.visible = before
    for role in AFTER_ROLES:
        layer = run.layers.get(role)
        if _alive(viewer, layer):
            layer.visible = not before
