"""The command line writes every file of its contract on a small real pair."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_register.cli import main
from napari_register.image import read_image
from napari_register.points import read_points

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
FAST = '{"levels": [8, 4], "iterations": [30, 20]}'


def test_register_2d_histology_with_points(tmp_path):
    h = SAMPLE / "histology"
    before = {p: p.read_bytes() for p in h.iterdir()}
    out = tmp_path / "out"
    rc = main(["register", str(h / "moving.jpg"), str(h / "fixed.jpg"), "--out", str(out), "--quiet",
               "--moving-points", str(h / "moving_points.csv"), "--fixed-points", str(h / "fixed_points.csv"),
               "--options", FAST])
    assert rc == 0
    for name in ("warped.jpg", "displacement.nii.gz", "jacobian.nii.gz", "qa.png", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    for key in ("method", "checkpoint", "io_steps", "device", "seconds", "fold_fraction", "tre_before", "tre_after"):
        assert key in m
    assert m["tre_after"] < 0.8 * m["tre_before"], m
    assert read_image(out / "warped.jpg").array.shape == read_image(h / "fixed.jpg").array.shape
    assert {p: p.read_bytes() for p in h.iterdir()} == before  # inputs untouched


def test_register_3d_with_labels(tmp_path):
    b = SAMPLE / "brain"
    out = tmp_path / "out"
    rc = main(["register", str(b / "moving.nii.gz"), str(b / "fixed.nii.gz"), "--out", str(out), "--quiet",
               "--moving-labels", str(b / "moving_seg.nii.gz"), "--fixed-labels", str(b / "fixed_seg.nii.gz"),
               "--options", FAST])
    assert rc == 0
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "qa.png"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["dice"]) == {"1", "2"}
    assert m["dice_mean"] > m["dice_mean_before"]
    warped_labels = read_image(out / "warped_labels.nii.gz", labels=True)
    assert set(np.unique(warped_labels.array)) <= {0, 1, 2}
    fixed = read_image(b / "fixed.nii.gz")
    assert warped_labels.geometry.spacing == fixed.geometry.spacing


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    b = SAMPLE / "brain"
    assert main(["register", str(tmp_path / "nope.nii.gz"), str(b / "fixed.nii.gz"), "--out", str(tmp_path)]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err
    h = SAMPLE / "histology"
    assert main(["register", str(h / "moving.jpg"), str(b / "fixed.nii.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "2D" in capsys.readouterr().err


def test_points_csv(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text(",X,Y,Z\n0,1.5,2,3\n1,4,5,6\n")
    np.testing.assert_allclose(read_points(p, 3), [[1.5, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="Z"):
        read_points(_write(tmp_path / "q.csv", "X,Y\n1,2\n"), 3)


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p
