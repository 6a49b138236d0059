"""Training and evaluation data: the data root and the ONE hold-out list.

Sub-modules: :mod:`.synthmorph` (label-map pairs), :mod:`.volumes` (real volumes from the data
root), :mod:`.pairs` (the mixed 2D/3D pair source the deformable recipes train on) and
:mod:`.photos` (photo pairs with a known homography, for ART and AltO). The benchmark imports
:data:`HOLDOUT` from here, so what is evaluated can never drift into what is trained on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

DATA_ENV = "NAPARI_REGISTER_DATA"


def data_root() -> Path:
    """``$NAPARI_REGISTER_DATA`` or ``../shared/data`` beside the source tree."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def skip_reason() -> Optional[str]:
    """Why real-data work cannot run here (for ``pytest.skip``), or ``None`` when the data is present."""
    root = data_root()
    if not (root / "README.md").is_file():
        return (f"real data not found at {root}; set {DATA_ENV} to the folder holding "
                "brain3d/, prostate3d/ and histology2d/")
    return None


# Benchmark cases, by data set. Training sources drop every file named here.
PROSTATE_PAIRS = ((0, 1), (3, 8), (9, 11), (12, 14), (17, 18))  # inter-subject MR (moving, fixed) cases
MR_US_CASES = (0, 1, 2, 3, 4)  # paired MR -> ultrasound cases
HISTOLOGY_LESIONS = ("les1",)  # CIMA lesion 1, every stain (the histology task)
BENCHMARK_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")  # scikit-image names


class Holdout:
    """What the benchmark evaluates on; ``excludes(path)`` tells a training source to drop a file."""

    prostate_cases = frozenset(n for pair in PROSTATE_PAIRS for n in pair) | frozenset(MR_US_CASES)
    files = frozenset({"brain3d/oasis_pair"})  # folders or files, relative to the data root
    photos = frozenset(BENCHMARK_PHOTOS)

    def excludes(self, rel: str) -> bool:
        rel = rel.replace("\\", "/")
        if any(rel == f or rel.startswith(f + "/") for f in self.files):
            return True
        name = rel.rsplit("/", 1)[-1]
        if rel.startswith("prostate3d/") and name.startswith("case"):
            return int(name[4:10]) in self.prostate_cases
        if rel.startswith("histology2d/"):
            return any(les in name for les in HISTOLOGY_LESIONS)
        return False


HOLDOUT = Holdout()
