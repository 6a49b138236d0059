"""Cohort registration: many pairs in one command, on Dask distributed.

``napari-register batch pairs.csv --out results/`` (or ``--template T subjects/*.nii.gz``) and
:func:`register_many` send every pair through :func:`napari_register.outputs.register_to_folder`
(the pipeline of ``register``) into ``results/<name>/``, then write ``summary.csv``, ``summary.md``
and ``summary.png``. The engine is a Dask ``LocalCluster`` sized to the machine (one model per
worker, loaded once) or an existing cluster (``--scheduler ADDRESS``). A pair whose folder already
says done is skipped; a failed pair is reported with its error and does not stop the others; pairs
of a lost worker are rerun elsewhere by the scheduler, and outputs are written atomically, so a
rerun or a retry never sees a half-written file.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .outputs import PairFiles, atomic_path, is_done

COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels", "moving_points", "fixed_points", "name")
WORKER_MEMORY_GB = 4.0  # what one 3D pair needs at most on CPU (OASIS with CARL + IO: ~3 GB)


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pairs", nargs="*", help="a pairs CSV, or with --template the subject images")
    p.add_argument("--template", help="register every SUBJECT onto this fixed image (all-to-one)")
    p.add_argument("--out", required=True, help="results folder: <out>/<name>/ per pair, <out>/summary.*")
    p.add_argument("--method", default="optimize", help="registration method (see `napari-register methods`)")
    p.add_argument("--checkpoint", help="shipped checkpoint name or .pt path; default: the method's own")
    p.add_argument("--io-steps", type=int, help="instance-optimisation steps per pair (default: the method's)")
    p.add_argument("--options", help="method options as JSON")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, help="local Dask workers (default: sized to the cores and memory)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786) to use instead")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------- the pairs

def _name(path: str) -> str:
    from .image import file_suffix

    name, ext = Path(path).name, file_suffix(Path(path))
    stem = name[: len(name) - len(ext)] if ext else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "pair"


def named_pairs(pairs: Iterable[Union[PairFiles, dict, Sequence[str]]]) -> list[tuple[str, PairFiles]]:
    """``(name, files)`` for each pair: names given (a dict's ``name``) or made from the file names,
    unique (``_2``, ``_3`` for repeats)."""
    out, seen = [], set()
    for item in pairs:
        if isinstance(item, PairFiles):
            name, files = None, item
        elif isinstance(item, dict):
            fields = {k: (str(v) if v else None) for k, v in item.items() if k in COLUMNS}
            name = fields.pop("name", None)
            files = PairFiles(**fields)
        else:
            files, name = PairFiles(*map(str, item)), None
        base = name or f"{_name(files.moving)}_to_{_name(files.fixed)}"
        unique, n = base, 1
        while unique in seen:
            n += 1
            unique = f"{base}_{n}"
        if name and unique != name:
            raise ValueError(f"pair name {name!r} appears twice; names must be unique (they name the output folders)")
        seen.add(unique)
        out.append((unique, files))
    return out


def read_pairs_csv(path: str | Path) -> list[dict[str, Optional[str]]]:
    """Rows of a pairs CSV (header ``moving,fixed[,moving_labels,fixed_labels,moving_points,
    fixed_points,name]``); relative paths are taken relative to the CSV's folder."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such pairs CSV")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    header = [h.strip() for h in (rows[0].keys() if rows else [])]
    if not rows or "moving" not in header or "fixed" not in header:
        raise ValueError(f"{p}: expected a header row with columns moving,fixed (and optionally "
                         f"{','.join(COLUMNS[2:])}) and at least one pair")
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise ValueError(f"{p}: unknown column(s) {unknown}; the columns are {','.join(COLUMNS)}")
    out = []
    for i, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() or None for k, v in row.items() if k}
        if not row.get("moving") or not row.get("fixed"):
            raise ValueError(f"{p}, line {i}: a pair needs both moving and fixed")
        for k in COLUMNS[:-1]:
            if row.get(k) and not Path(row[k]).is_absolute():
                row[k] = str(p.parent / row[k])
        out.append(row)
    return out


# ----------------------------------------------------------------------------------- one pair

@functools.lru_cache(maxsize=4)
def _method(name: str, dim: int, device: str, checkpoint: Optional[str], options: str) -> Any:
    """One method instance (its network loaded once) per worker process and settings."""
    from .api import make_method, resolve_device

    return make_method(name, dim, resolve_device(device), checkpoint, json.loads(options))


def _worker_device(device: str) -> str:
    """On a GPU worker of a local cluster, the GPU of its index; otherwise ``device`` as given."""
    if device != "cuda":
        return device
    try:
        from distributed import get_worker
        import torch

        name = get_worker().name
        return f"cuda:{int(name) % torch.cuda.device_count()}" if str(name).isdigit() else device
    except (ImportError, ValueError):
        return device


def run_pair(name: str, files: PairFiles, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Register one pair into ``out/<name>/`` and return its summary row; a bad pair returns a row
    with ``status: failed`` and its error instead of raising (it must not stop the others)."""
    from .outputs import register_to_folder

    threads = settings.get("torch_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    device = _worker_device(settings["device"])
    method = functools.partial(_method, settings["method"], device=device, checkpoint=settings["checkpoint"],
                               options=json.dumps(settings["options"] or {}, sort_keys=True))
    start = time.perf_counter()
    try:
        metrics = register_to_folder(files, Path(out) / name, method=lambda dim: method(dim=dim),
                                     io_steps=settings["io_steps"], device=device)
    except Exception as e:  # noqa: BLE001 - reported in the summary; the cohort goes on
        return {"name": name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "seconds": round(time.perf_counter() - start, 3)}
    return _row(name, metrics, "done")


def _row(name: str, metrics: dict[str, Any], status: str) -> dict[str, Any]:
    keep = ("seconds", "dice_mean_before", "dice_mean", "tre_before", "tre_after", "fold_fraction")
    return {"name": name, "status": status, "error": "", **{k: metrics[k] for k in keep if k in metrics}}


# ----------------------------------------------------------------------------------- the engine

def cluster_size(device: str = "auto") -> tuple[int, int]:
    """``(workers, torch threads per worker)`` that fit this machine: one worker per GPU with
    CUDA; on CPU as many single-pair workers as the cores and memory (``WORKER_MEMORY_GB`` each) allow."""
    import psutil

    cores = os.cpu_count() or 1
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count(), max(1, cores // torch.cuda.device_count())
    memory_gb = psutil.virtual_memory().total / 2 ** 30
    workers = max(1, min(cores, int(memory_gb // WORKER_MEMORY_GB)))
    return workers, max(1, cores // workers)


def register_many(pairs: Iterable[Union[PairFiles, dict, Sequence[str]]], out: str | Path, *,
                  method: str = "optimize", checkpoint: Optional[str] = None, io_steps: Optional[int] = None,
                  device: str = "auto", options: Optional[dict] = None, workers: Optional[int] = None,
                  scheduler: Optional[str] = None, client: Any = None, progress: bool = False,
                  torch_threads: Optional[int] = None) -> Any:
    """Register every pair on Dask into ``out/<name>/``; returns the summary table (a pandas
    DataFrame when pandas is installed, else a list of dicts), also written as ``out/summary.*``.

    ``client``: a ``distributed.Client`` to use; else ``scheduler`` (an address) or a new
    ``LocalCluster`` of ``workers`` single-pair workers (default: :func:`cluster_size`).
    ``torch_threads``: per worker (default: the cores shared among a local cluster's workers; a
    given client or scheduler keeps its workers' own setting, which Dask makes 1).
    """
    from distributed import Client, LocalCluster, as_completed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = named_pairs(pairs)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for name, files in jobs:
        if is_done(out / name):  # resume: a finished pair is not run again
            rows[name] = _row(name, json.loads((out / name / "metrics.json").read_text()), "done (earlier run)")
        else:
            todo.append((name, files))
    n_workers, threads = cluster_size(device) if workers is None else (workers, max(1, (os.cpu_count() or 1) // workers))
    settings = {"method": method, "checkpoint": checkpoint, "io_steps": io_steps, "device": device,
                "options": options,
                "torch_threads": torch_threads if torch_threads else None if scheduler or client else threads}
    own: list[Any] = []
    if client is None and todo:
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", memory_limit=None)
            client = Client(cluster)
            own.append(cluster)
        own.insert(0, client)
    try:
        if todo:
            if progress:
                print(f"napari-register batch: {len(todo)} pair(s) to run, {len(rows)} done before; "
                      f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
            run = uuid.uuid4().hex[:8]  # fresh keys: a rerun must not get an earlier run's result back
            futures = [client.submit(run_pair, name, files, str(out), settings, key=f"pair-{name}-{run}", pure=False)
                       for name, files in todo]
            bar = _progress_bar(len(futures)) if progress else None
            for future in as_completed(futures):
                row = future.result()
                rows[row["name"]] = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{row['name']}: {row['status']}")
            if bar is not None:
                bar.close()
    finally:
        for thing in own:
            thing.close()
    table = [rows[name] for name, _ in jobs]
    write_summary(table, out)
    try:
        import pandas as pd
    except ImportError:
        return table
    return pd.DataFrame(table)


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", file=sys.stderr)


# ----------------------------------------------------------------------------------- the summary

METRICS = (("dice_mean", "Dice", True), ("tre_after", "TRE", False), ("fold_fraction", "folds", False),
           ("seconds", "seconds", False))


def _stats(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, median and worst (lowest Dice, highest TRE / folds / seconds) over the finished pairs."""
    import numpy as np

    out = []
    for label in ("mean", "median", "worst"):
        row: dict[str, Any] = {"name": label, "status": "", "error": ""}
        for key, _, higher_better in METRICS + (("dice_mean_before", "", True), ("tre_before", "", False)):
            values = [r[key] for r in table if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if values:
                fn = {"mean": np.mean, "median": np.median, "worst": np.min if higher_better else np.max}[label]
                row[key] = float(fn(values))
        out.append(row)
    return out


def write_summary(table: list[dict[str, Any]], out: Path) -> None:
    """``summary.csv`` (every pair, then mean / median / worst), ``summary.md`` and ``summary.png``
    (the accuracy of each pair, sorted), each written atomically."""
    columns = ["name", "status", "dice_mean_before", "dice_mean", "tre_before", "tre_after", "fold_fraction",
               "seconds", "error"]
    stats = _stats(table)
    with atomic_path(out / "summary.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(table + stats)

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")

    failed = sum(r["status"] == "failed" for r in table)
    lines = [f"# Batch summary: {len(table)} pairs, {failed} failed", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in table + stats]
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    _plot(table, out / "summary.png")


def _plot(table: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key, label = next(((k, lab) for k, lab, _ in METRICS[:2] if any(k in r for r in table)), ("seconds", "seconds"))
    done = sorted((r for r in table if key in r), key=lambda r: r[key])
    fig = Figure(figsize=(max(4.0, 0.35 * len(done) + 2), 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(done)), [r[key] for r in done], color="tab:blue", label="after")
    before = {"dice_mean": "dice_mean_before", "tre_after": "tre_before"}.get(key)
    if before and any(before in r for r in done):
        ax.plot(range(len(done)), [r.get(before, math.nan) for r in done], "k_", markersize=14, label="before")
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks(range(len(done)), [r["name"] for r in done], rotation=60, ha="right", fontsize=7)
    failed = sum(r["status"] == "failed" for r in table)
    ax.set_title(f"{label} per pair, sorted ({len(done)} pairs" + (f", {failed} failed)" if failed else ")"),
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)


# ----------------------------------------------------------------------------------- the command

def run_batch(args: argparse.Namespace) -> int:
    if args.template:
        if not args.pairs:
            raise ValueError("--template needs the subject images: napari-register batch --template T S1 S2 ...")
        pairs: list[Any] = [PairFiles(s, args.template) for s in args.pairs]
    else:
        if len(args.pairs) != 1:
            raise ValueError("give one pairs CSV (or --template T and the subject images)")
        pairs = read_pairs_csv(args.pairs[0])
    from .methods.registry import check_options, get_method, parse_options

    options = check_options(get_method(args.method), parse_options(args.options))  # fail now, not per pair
    table = register_many(pairs, args.out, method=args.method, checkpoint=args.checkpoint, io_steps=args.io_steps,
                          device=args.device, options=options, workers=args.workers, scheduler=args.scheduler,
                          progress=not args.quiet)
    rows = table.to_dict("records") if hasattr(table, "to_dict") else table
    failed = [r for r in rows if r["status"] == "failed"]
    if not args.quiet:
        print(f"{len(rows)} pairs, {len(failed)} failed: {Path(args.out) / 'summary.md'}")
    for r in failed:
        print(f"napari-register batch: {r['name']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
