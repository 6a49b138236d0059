"""npe2 sample data: the brain pair (3D MRI + label maps) and the histology pair (2D RGB + landmarks)."""
from __future__ import annotations

from pathlib import Path

from ..image import Image, read_image
from .layers import LayerData, image_layer, points_layer


def sample_dir() -> Path:
    """``sample_data/`` inside the package when installed with it, else at the source tree's root."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "sample_data", here.parent / "sample_data"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"sample_data/ not found next to {here}; reinstall napari-register from its "
                            "source tree (pip install -e .) to get the sample images")


def _pair(folder: str, ext: str) -> tuple[Image, Image]:
    d = sample_dir() / folder
    return read_image(d / f"fixed{ext}"), read_image(d / f"moving{ext}")


def brain_pair() -> list[LayerData]:
    """OASIS brain MRI pair (moving, fixed) with their label maps (0 background, 1, 2)."""
    fixed, moving = _pair("brain", ".nii.gz")
    # fixed in grey, moving in magenta on top (additive), so misalignment shows as colour fringes
    layers = [image_layer(fixed, "fixed", colormap="gray", metadata={"path": fixed.path}),
              image_layer(moving, "moving", colormap="magenta", blending="additive", metadata={"path": moving.path})]
    for role in ("fixed", "moving"):
        seg = read_image(sample_dir() / "brain" / f"{role}_seg.nii.gz", labels=True)
        layers.append(image_layer(seg, f"{role}_seg", "labels", opacity=0.4, visible=False,
                                  metadata={"path": seg.path}))
    return layers


def histology_pair() -> list[LayerData]:
    """Lung histology pair (CD31 moving, HE fixed, RGB) with corresponding landmarks."""
    from ..points import read_points

    fixed, moving = _pair("histology", ".jpg")
    layers = [image_layer(fixed, "fixed", metadata={"path": fixed.path}),
              image_layer(moving, "moving", opacity=0.5, metadata={"path": moving.path})]
    for image, role, colour in ((fixed, "fixed", "cyan"), (moving, "moving", "magenta")):
        pts = read_points(sample_dir() / "histology" / f"{role}_points.csv", 2)  # photos: pixels = physical
        layers.append(points_layer(pts, image.geometry, f"{role}_points", face_color=colour, size=12))
    return layers
