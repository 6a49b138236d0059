"""The command line writes every file of its contract on a small real pair, and tells the user
what is going on: a readable, quick ``--help``, progress fit for a terminal or a log, ``--quiet``,
``--profile``."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_register.cli import ProgressPrinter, main
from napari_register.image import read_image
from napari_register.points import read_points
from napari_register.progress import Progress

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
FAST = '{"levels": [8, 4], "iterations": [30, 20]}'
FASTEST = '{"levels": [4], "iterations": [5], "affine_iterations": 5}'  # seconds on the histology pair


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
               "--moving-labels", str(b / "moving_seg.nii.gz"), "--fixed-labels", str(b / "fixed_seg.nii.gz")])
    assert rc == 0  # the defaults: the coarse FAST levels alone leave this affinely aligned pair where it was
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


def test_help_is_plain_text_lists_every_command_and_does_not_import_torch():
    script = """
import contextlib, io, json, sys
from napari_register.cli import main
texts = []
for argv in (["--help"], ["register", "--help"]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(argv)
        except SystemExit:
            pass
    texts.append(buf.getvalue())
print(json.dumps({"texts": texts, "torch": "torch" in sys.modules}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)
    top, register = out["texts"]
    assert not out["torch"], "--help imported torch (seconds of start-up for nothing)"
    for text in (top, register):
        assert "``" not in text and ":func:" not in text, text  # reST is for the module docstring
    for command in ("register", "demo", "batch", "methods", "train"):
        assert f"\n    {command} " in top, command  # in the command list, with its help line
    assert "exit codes" in top and "metrics.json" in top
    assert "--profile" in register and "--quiet" in register


def _histology_run(tmp_path, monkeypatch, capsys, *flags: str) -> tuple[dict, str, str]:
    """``register`` on the histology pair given by relative paths; (metrics, stdout, stderr)."""
    monkeypatch.chdir(SAMPLE / "histology")
    out = tmp_path / "out"
    rc = main(["register", "moving.jpg", "fixed.jpg", "--out", str(out), "--moving-points", "moving_points.csv",
               "--fixed-points", "fixed_points.csv", "--options", FASTEST, "--device", "cpu", *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads((out / "metrics.json").read_text()), captured.out, captured.err


def test_progress_lines_profile_and_absolute_paths(tmp_path, monkeypatch, capsys):
    metrics, out, err = _histology_run(tmp_path, monkeypatch, capsys, "--profile")
    for role, name in (("moving", "moving.jpg"), ("fixed", "fixed.jpg"), ("moving_points", "moving_points.csv"),
                       ("fixed_points", "fixed_points.csv")):  # typed relative, recorded absolute
        assert metrics[role] == str(SAMPLE / "histology" / name)
    # stderr is not a terminal here: whole lines, no carriage returns, the estimate first
    assert "\r" not in err
    lines = err.splitlines()
    estimate = next(i for i, ln in enumerate(lines) if ln.startswith("napari-register: estimated time"))
    first_stage = next(i for i, ln in enumerate(lines) if ln.startswith("[1/"))
    assert estimate < first_stage
    assert "(optimize, CPU)" in lines[estimate]
    assert any(ln.startswith("[") and " done " in ln and "100%" in ln for ln in lines)
    # --profile: the breakdown of the whole command, the same as metrics.json's timings
    timings = metrics["timings"]
    for part in ("start-up", "imports", "read inputs", "registration", "registration: preparing",
                 "registration: finishing", "outputs", "outputs: displacement.nii.gz", "outputs: qa.png", "total"):
        assert part in timings, part
    assert any(k.startswith("registration: optimize level") for k in timings)
    assert timings["total"] >= timings["registration"] + timings["outputs"]
    profile = err[err.index("napari-register: profile"):]
    for part in ("start-up", "read inputs", "preparing", "qa.png", "total"):
        assert f"  {part} " in profile, part
    # not quiet: the files written, then the summary
    assert out.splitlines()[:-1] == [str(tmp_path / "out" / name) for name in metrics["outputs"]]


def test_quiet_prints_exactly_the_summary_line(tmp_path, monkeypatch, capsys):
    metrics, out, err = _histology_run(tmp_path, monkeypatch, capsys, "--quiet")
    assert len(out.splitlines()) == 1
    summary = json.loads(out)
    assert summary["tre_after"] == metrics["tre_after"] and summary["seconds"] == metrics["seconds"]
    assert err == ""  # no progress, no estimate (this pair needs no note)


class _Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def _steps(n: int) -> list[Progress]:
    """Stage "a", the first of two: ``n`` steps over half the run."""
    return [Progress("a", i, n, fraction=0.5 * i / n, stage_index=1, stages=2) for i in range(1, n + 1)]


def test_progress_printer_lines_in_a_log_one_line_on_a_terminal():
    clock = _Clock()
    log = io.StringIO()
    show = ProgressPrinter("optimize", "cpu", stream=log, tty=False, clock=clock)
    show(Progress("estimate", 0, 0, eta=12.0))
    for p in _steps(100):  # all within a second
        show(p)
    clock.t = 30.0
    show(Progress("b", 1, 100, fraction=0.501, stage_index=2, stages=2))  # a new stage: a line at once
    show(Progress("b", 2, 100, fraction=0.502, stage_index=2, stages=2))  # too soon, too little: none
    clock.t = 45.0
    show(Progress("b", 3, 100, fraction=0.503, stage_index=2, stages=2))  # little done, but 15 s since
    show(Progress("done", 1, 1, fraction=1.0, stage_index=2, stages=2))
    lines = log.getvalue().splitlines()
    assert lines[0] == "napari-register: estimated time: about 12 s (optimize, CPU)"
    a_lines = [ln for ln in lines if ln.startswith("[1/2] a ")]
    assert 5 <= len(a_lines) <= 12  # the stage's first step, then every 5 % of the run
    assert [ln.split()[1] for ln in lines[-3:]] == ["b", "b", "done"]
    assert "\r" not in log.getvalue()

    term = io.StringIO()
    show = ProgressPrinter("optimize", "cpu", stream=term, tty=True, clock=clock)
    for p in _steps(10):
        clock.t += 1.0
        show(p)
    show(Progress("note", 0, 0, message="CUDA ran out of memory"))
    text = term.getvalue()
    assert text.count("\r") == 10 and text.count("\n") == 2  # one line redrawn, ended before the note
    assert text.endswith("napari-register: note: CUDA ran out of memory\n")


def test_quiet_printer_shows_only_notes():
    log = io.StringIO()
    show = ProgressPrinter("optimize", "cpu", quiet=True, stream=log, tty=False)
    show(Progress("estimate", 0, 0, eta=3.0))
    show(Progress("a", 1, 2, fraction=0.5))
    show(Progress("note", 0, 0, message="running on the CPU instead"))
    assert log.getvalue() == "napari-register: note: running on the CPU instead\n"


def test_readme_and_ci_install_the_same_display_packages():
    root = SAMPLE.parent
    readme = root.joinpath("README.md").read_text()
    line = readme[readme.index("apt-get install -y "):].split("\n\n")[0]  # to the end of the command
    line = line.split("\npython3")[0].replace("\\\n", " ")
    ci = root.joinpath(".ci", "run").read_text()
    ci_packages = ci[ci.index('PACKAGES="') + 10:].split('"')[0].split()
    assert set(line.split()[3:]) == set(ci_packages)
    assert "libxcb-cursor0" in ci_packages  # PySide6's xcb plugin will not load without it
