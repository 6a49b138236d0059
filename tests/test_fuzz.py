"""Fuzzing the readers: whatever bytes a file holds, reading it either works or raises our input
error naming the file - never another exception, never a crash. Bounded and seeded (derandomized)
so a run is repeatable and quick."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from napari_register.coords import Geometry  # noqa: E402
from napari_register.errors import InputError  # noqa: E402
from napari_register.image import Image, read_image, write_image  # noqa: E402
from napari_register.points import read_points  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt tags, as it reads on

SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd", ".png", ".jpg", ".tif", ".bmp")
FUZZ = settings(max_examples=50, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _valid(suffix: str, folder: Path) -> bytes:
    """The bytes of a small valid file of that type: mutations of it reach past the magic bytes."""
    rng = np.random.default_rng(0)
    if suffix in (".png", ".jpg", ".tif", ".bmp"):
        image = Image((rng.random((6, 7)) * 255).astype(np.uint8), Geometry.default((6, 7)))
    else:
        image = Image(rng.random((3, 4, 5)).astype(np.float32), Geometry.default((3, 4, 5)))
    return write_image(image, folder / f"valid{suffix}").read_bytes()


def _read(path: Path, data: bytes, labels: bool = False) -> None:
    path.write_bytes(data)
    try:
        read_image(path, labels=labels)
    except InputError as e:
        assert path.name in str(e), str(e)


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(suffix, data, tmp_path):
    _read(tmp_path / f"fuzz{suffix}", data)


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10 ** 6)), labels=st.booleans())
def test_mutated_valid_files(suffix, edits, cut, labels, tmp_path):
    """A valid file with a few bytes changed (headers: sizes, spacing, types) and maybe truncated."""
    data = bytearray(_valid(suffix, tmp_path))
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _read(tmp_path / f"fuzz{suffix}", bytes(data), labels)


@FUZZ
@given(text=st.text(max_size=400), ndim=st.sampled_from([2, 3]))
def test_points_csv_text(text, ndim, tmp_path):
    path = tmp_path / "points.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        pts = read_points(path, ndim)
    except InputError as e:
        assert "points.csv" in str(e)
    else:
        assert pts.shape[1] == ndim and np.isfinite(pts).all()


@FUZZ
@given(rows=st.lists(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                                        st.text(max_size=5)), max_size=4), max_size=6))
def test_points_csv_rows(rows, tmp_path):
    """A right header with arbitrary cells below it."""
    path = tmp_path / "points.csv"
    path.write_text("X,Y,Z\n" + "\n".join(",".join(c.replace(",", ";").replace("\n", " ") for c in r) for r in rows),
                    encoding="utf-8", errors="surrogatepass")
    try:
        pts = read_points(path, 3)
    except InputError as e:
        assert "points.csv" in str(e)
    else:
        assert pts.shape[1] == 3 and np.isfinite(pts).all()


def test_binary_garbage_as_points(tmp_path):
    path = tmp_path / "points.csv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="points.csv"):
        read_points(path, 3)
