"""Every case of the bad-input corpus (tests/bad_inputs.py), for every method, through the command
line: one line naming the file and what to do, exit code 2, no traceback, the inputs byte for byte
as they were, no half-written output, and no checkpoint payload run."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from bad_inputs import CASES, build
from corpus_files import PAYLOAD_MARKER, Payload, pair
from napari_register.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, main

PARAMS = [pytest.param(name, m, id=f"{name}-{m}") for name, (_, methods) in CASES.items() for m in methods]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _digest(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.mark.parametrize("name, method", PARAMS)
def test_bad_input_is_one_clear_line(name, method, tmp_path, monkeypatch, capsys):
    case = build(name, tmp_path, method)
    before = _digest(case.inputs)
    if case.patch:
        case.patch(monkeypatch)
    rc = main(["register", *case.args])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    assert _digest(case.inputs) == before, "an input file changed"
    assert not (tmp_path / PAYLOAD_MARKER).exists(), "the checkpoint's payload ran"
    out = Path(case.args[case.args.index("--out") + 1])
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    if case.ok:  # accepted: it registers, with a note when there is something to say
        assert rc == EXIT_OK, err
        assert json.loads((out / "metrics.json").read_text())["status"] == "done"
        if case.expect:
            assert any(ln.startswith("napari-register: note: ") and re.search(case.expect, ln) for ln in lines), lines
        return
    assert rc == EXIT_BAD_INPUT, err
    assert len(lines) == 1 and lines[0].startswith("napari-register: error: "), lines
    assert re.search(case.expect, lines[0]), lines[0]
    assert case.names in lines[0], lines[0]
    # nothing half-written: no temporary files, and no metrics.json that would claim the run is done
    if out.exists():
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], list(out.iterdir())
        assert not (out / "metrics.json").exists()


def test_the_payload_is_real(tmp_path):
    """The corpus's pickle payload does run when loaded the unsafe way: refusing it proves something."""
    import torch

    torch.save({"x": Payload(tmp_path / PAYLOAD_MARKER)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / PAYLOAD_MARKER).exists()


def test_internal_error_has_its_own_code_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    moving, fixed = pair(tmp_path)
    import napari_register.api as api

    def broken(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(api, "_physical_transform", broken)
    args = ["register", str(moving), str(fixed), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu",
            "--options", '{"levels": [2], "iterations": [2], "affine_iterations": 0}']
    assert main(args) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "--debug" in err and "Traceback" not in err
    assert main(["--debug", *args]) == EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err
    assert main([*args, "--debug"]) == EXIT_INTERNAL  # the flag also works after the command
    assert "Traceback" in capsys.readouterr().err
