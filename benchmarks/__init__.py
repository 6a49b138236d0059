"""The benchmark of napari-register: our methods and the peers on the real data, one harness.

Run it as a package from the repository root (``python -m benchmarks --help`` lists the
sub-commands). The product never imports this package; it imports the product, and takes the data
root and the hold-out list from :mod:`napari_register.data`.

Every run writes one folder ``benchmarks/results/<run-name>/`` (``results.json``, ``results.md``,
plots, with the command and the code version recorded); ``benchmarks/results/README.md`` indexes
the runs and says which one is current for which task. ``docs/benchmarks.md`` describes the tasks,
the peers and their settings.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def new_run_dir(name: str, root: Path = RESULTS) -> Path:
    """A fresh folder ``root/<today>-<name>`` (``-2``, ``-3``... when that one exists), created."""
    base = f"{date.today().isoformat()}-{name}"
    path, n = root / base, 1
    while path.exists():
        n += 1
        path = root / f"{base}-{n}"
    path.mkdir(parents=True)
    return path


def code_version() -> str:
    """The git commit of the working tree (``+dirty`` with uncommitted changes): the same record the
    checkpoint cards carry."""
    from napari_register.weights import git_version

    return git_version()


def command_line(prog: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed, for the record: ``python -m benchmarks <prog> ARGS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m benchmarks", prog, *args])


def provenance(prog: str, argv: Optional[Sequence[str]] = None) -> dict[str, str]:
    """What a run records about itself: ``date``, ``machine``, ``command``, ``code_version``."""
    return {"date": date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "command": command_line(prog, argv), "code_version": code_version()}


def provenance_line(record: dict[str, Any]) -> str:
    return (f"Measured {record['date']} on {record['machine']}; code {record['code_version']}; "
            f"command: `{record['command']}`.")


def _jsonable(o: Any) -> Any:
    try:
        return float(o)  # numpy scalars
    except (TypeError, ValueError):
        return str(o)


def write_run(out: Path, record: dict[str, Any], data: dict[str, Any], markdown: str, title: str = "",
              note: str = "") -> str:
    """``out/results.json`` (``record`` of :func:`provenance`, the header line, then ``data``) and
    ``out/results.md`` (``title``, the header line: provenance and ``note``, then ``markdown``).
    Returns the markdown written."""
    out.mkdir(parents=True, exist_ok=True)
    header = " ".join(filter(None, [provenance_line(record), note]))
    (out / "results.json").write_text(json.dumps({**record, "header": header, **data}, indent=1,
                                                 default=_jsonable) + "\n")
    text = "\n".join([*([f"# {title}", ""] if title else []), header, "", markdown.strip(), ""])
    (out / "results.md").write_text(text)
    return text
