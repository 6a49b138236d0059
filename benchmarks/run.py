"""The benchmark suite: our methods and the peers, side by side, in one run, on the real data.

    python -m benchmarks run [--quick] [--tasks oasis prostate mr_us histology photos] [--device cpu]

Every method goes through the same harness (:mod:`benchmarks.peers`): a runner returns a SimpleITK
transform (fixed -> moving), the harness times it, records peak memory, warps the labels, maps the
landmarks and measures folding. Writes ``results.json``, ``results.md`` (both with the command and
the code version) and one ``plot_<task>.png`` (accuracy against time) into a new run folder
``benchmarks/results/<date>-<name>/`` (``--out`` to choose another folder).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from benchmarks import new_run_dir, peers, photos, provenance, write_run
from benchmarks.tasks import Case, Pair, cases, load
from napari_register.data import skip_reason
from napari_register.methods.carl import BRAIN_SETTINGS

DEVICE = "cpu"
TASKS = ["oasis", "prostate", "mr_us", "histology", "photos"]

# Per task, which accuracy number the table leads with, and whether higher is better.
METRIC = {"oasis": ("dice", True), "prostate": ("dice", True), "prostate_val": ("dice", True), "mr_us": ("dice", True),
          "histology": ("tre", False), "photos_clean": ("mace", False), "photos_degraded": ("mace", False),
          "photos_modality": ("mace", False)}


def _warm_ours() -> None:
    # Imports are not charged to the first run (as a peer's are not): torch, and torch._dynamo,
    # which torch.optim imports at its first step (~1 s).
    import torch._dynamo  # noqa: F401

    import napari_register.api  # noqa: F401


def ours(method: str, io_steps: int = 0, options: Optional[dict] = None, label: str = "",
         dims: tuple[int, ...] = (2, 3), modalities: tuple[str, ...] = ("mono",),
         checkpoint: Optional[str] = None, seed_with: Optional[peers.Peer] = None) -> peers.Peer:
    """A harness runner for one of our methods (``api.register`` -> ITK displacement field).
    ``seed_with``: another of these runners (a homography method) run first on the pair, its matrix
    the pre-alignment of this one ("homography first, then deformable"); both are timed."""

    def run(pair: Pair, matrix_only: bool = False):
        from napari_register.api import homography_first, register
        from napari_register.image import from_sitk

        prealign = homography_first(seed_with.run(pair, matrix_only=True)) if seed_with else None
        res = register(from_sitk(pair.moving), from_sitk(pair.fixed), method=method, io_steps=io_steps,
                       options=options, device=DEVICE, checkpoint=checkpoint, prealign=prealign)
        return res if matrix_only else res.field.to_sitk()

    return peers.Peer(run=run, dims=dims, modalities=modalities, label=label or method, warm=_warm_ours)


OURS = {
    "optimize": ours("optimize", label="ours: optimize (LNCC)", modalities=("mono", "multi")),
    "optimize_mind": ours("optimize", options={"similarity": "mind"}, label="ours: optimize (MIND)",
                          modalities=("multi",)),
    "carl": ours("carl", label="ours: CARL (affine + network)"),
    "carl_noaffine": ours("carl", options={"affine_iterations": 0}, label="ours: CARL network alone"),
    # 50 fine-tuning steps take ~8 min on the OASIS working grid (2 cores), seconds in 2D.
    "carl_io": ours("carl", io_steps=50, label="ours: CARL + IO 50"),
    "carl_io_brain": ours("carl", io_steps=50, options=BRAIN_SETTINGS, label="ours: CARL + IO 50, brain settings"),
    "carl_io100_brain": ours("carl", io_steps=100, options=BRAIN_SETTINGS,
                             label="ours: CARL + IO 100, brain settings"),
    "ran": ours("ran", label="ours: RAN (affine + network)"),
    "ran_io": ours("ran", io_steps=50, label="ours: RAN + IO 50"),
    "art": ours("art", label="ours: ART", dims=(2,), modalities=("mono", "multi")),
    "art_io": ours("art", io_steps=50, label="ours: ART + IO 50", dims=(2,), modalities=("mono", "multi")),
    "alto": ours("alto", io_steps=150, label="ours: AltO + corner fit 150 (default)", dims=(2,),
                 modalities=("mono", "multi")),
}
# "homography first, then deformable": optimize keeps its own affine stage after AltO's homography
OURS["alto_optimize"] = ours("optimize", label="ours: AltO homography, then optimize (LNCC)", dims=(2,),
                             modalities=("mono", "multi"), seed_with=OURS["alto"])
OURS["alto_optimize_mind"] = ours("optimize", options={"similarity": "mind"}, dims=(2,), modalities=("mono", "multi"),
                                  label="ours: AltO homography, then optimize (MIND)", seed_with=OURS["alto"])
QUICK_PEERS = ("identity", "sitk_demons", "elastix_bspline", "elastix_affine_bspline", "opencv_sift")


def _available_ours() -> dict[str, peers.Peer]:
    from napari_register.methods.registry import list_methods

    known = set(list_methods())
    return {k: v for k, v in OURS.items() if k.split("_")[0] in known}


def _photo_pair(pc: photos.PhotoCase) -> Pair:
    case = Case(pc.task, pc.name, 2, pc.multimodal, moving=Path(pc.name), fixed=Path(pc.name), tre_unit="px")
    return Pair(case, photos.to_sitk(pc.moving), photos.to_sitk(pc.fixed))


def _score_photo(row: dict[str, Any], pc: photos.PhotoCase) -> None:
    tx = row.pop("transform", None)
    if tx is not None:
        row["mace"] = photos.mace(lambda pts: np.array([tx.TransformPoint(tuple(map(float, p))) for p in pts]),
                                  pc.truth)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str)) and not k.startswith("_")}


def run(tasks: list[str], quick: bool, only: Optional[list[str]] = None, skip: tuple[str, ...] = (),
        save: Optional[Callable[[list[dict[str, Any]]], None]] = None) -> list[dict[str, Any]]:
    """Run every chosen method on every case of ``tasks``; ``save(rows)`` after each result so an
    interrupted run keeps what it measured. ``skip``: ``task:method`` pairs to leave out."""
    runners = {**peers.RUNNERS, **_available_ours()}
    peers.RUNNERS.update(runners)  # the harness looks labels up there
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        rows.append(_clean(row))
        if save is not None:
            save(rows)

    def chosen(name: str, task: str = "") -> bool:
        if f"{task}:{name}" in skip:
            return False
        if only:
            return name in only
        return not quick or name in QUICK_PEERS or name in OURS and "_io" not in name

    for task in tasks:
        if task == "photos":
            for variant in ("clean", "degraded", "modality"):
                for pc in photos.cases(variant, n=2 if quick else None):
                    pair = _photo_pair(pc)
                    for name, runner in runners.items():
                        if runner.applies(pair.case) and chosen(name, "photos"):
                            r = peers.run_peer(name, pair)
                            _score_photo(r, pc)
                            keep(r)
                            print(pc.name, name, r.get("error", round(r.get("mace", float("nan")), 2)), flush=True)
            continue
        task_cases = cases(task)
        if quick:
            task_cases = task_cases[:2] if task != "oasis" else task_cases
        for case in task_cases:
            pair = load(case)
            for name, runner in runners.items():
                if runner.applies(case) and chosen(name, task):
                    r = peers.run_peer(name, pair)
                    r.pop("transform", None)
                    keep(r)
                    key = METRIC[task][0]
                    print(case.name, name, r.get("error", {key: round(r.get(key, float("nan")), 4),
                                                          "s": round(r.get("seconds", 0), 1)}), flush=True)
    return rows


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = []
    for task in dict.fromkeys(s["task"] for s in summary):
        key, higher = METRIC.get(task, ("dice", True))
        rows = [s for s in summary if s["task"] == task]
        base = next((s for s in rows if s["peer"] == "identity"), None)
        best_peer = [s for s in rows if s["peer"] not in OURS and s["peer"] != "identity" and key in s]
        best = (max if higher else min)(best_peer, key=lambda s: s[key]) if best_peer else None
        lines += [f"### {task}", "", f"| method | cases (failed) | {key} | s/case | x best peer's time | "
                  f"peak MB | folds % |", "|---|---|---|---|---|---|---|"]
        for s in sorted(rows, key=lambda s: (s["peer"] != "identity", s["peer"] not in OURS, s["peer"])):
            label = peers.RUNNERS[s["peer"]].label or s["peer"]
            acc = f"{s[key]:.3f}" if key in s else "-"
            if best is not None and key in s and s["peer"] in OURS:
                better = s[key] >= best[key] if higher else s[key] <= best[key]
                acc += " (beats best peer)" if better else " (loses to best peer)"
            ratio = f"{s['seconds'] / best['seconds']:.2f}" if best and "seconds" in s and "seconds" in best else "-"
            f = lambda k, fmt, m=1.0: format(s[k] * m, fmt) if k in s else "-"  # noqa: E731
            lines.append(f"| {label} | {s['cases']} ({s['failed']}) | {acc} | {f('seconds', '.1f')} | {ratio} | "
                         f"{f('peak_mem_mb', '.0f')} | {f('fold_fraction', '.3f', 100)} |")
        if base is not None and key in base:
            lines.append(f"\nunregistered {key}: {base[key]:.3f}; best peer: "
                         f"{(peers.RUNNERS[best['peer']].label if best else '-')}\n")
        lines.append("")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    for task in dict.fromkeys(s["task"] for s in summary):
        key, higher = METRIC.get(task, ("dice", True))
        rows = [s for s in summary if s["task"] == task and key in s and "seconds" in s]
        if not rows:
            continue
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for s in rows:
            ours_ = s["peer"] in OURS
            ax.scatter(s["seconds"], s[key], marker="o" if ours_ else "s", color="C3" if ours_ else "C0")
            ax.annotate(peers.RUNNERS[s["peer"]].label or s["peer"], (s["seconds"], s[key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per case (log)")
        ax.set_ylabel(f"{key} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{task}: accuracy against time (red: ours)")
        fig.tight_layout()
        p = out / f"plot_{task}.png"
        fig.savefig(p, dpi=110)
        paths.append(p)
    return paths


def run_name(tasks: list[str], quick: bool) -> str:
    """The run folder's name after the date: ``suite`` / ``quick`` for every task, else the tasks."""
    which = "suite" if sorted(tasks) == sorted(TASKS) else "-".join(tasks)
    return f"{which}-quick" if quick and which != "suite" else ("quick" if quick else which)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--quick", action="store_true", help="a subset that finishes in minutes")
    ap.add_argument("--methods", nargs="+", help="only these runners (names of peers.RUNNERS / run.OURS)")
    ap.add_argument("--out", type=Path, help="folder for results.json/.md and plots "
                    "(default: a new benchmarks/results/<date>-<name>/)")
    ap.add_argument("--device", default="cpu", help="device for our methods (cpu, cuda, auto)")
    ap.add_argument("--skip", nargs="*", default=[], help="task:method pairs to leave out, e.g. oasis:carl_io")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    record = provenance("run", argv)
    reason = skip_reason()
    if reason and any(t != "photos" for t in args.tasks):
        print(f"skipping the real-data tasks: {reason}")
        args.tasks = [t for t in args.tasks if t == "photos"]
    out = args.out or new_run_dir(run_name(args.tasks, args.quick))
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing {out}", flush=True)
    t0 = time.time()

    def save(rows: list[dict[str, Any]]) -> str:
        summary = peers.summarise(rows)
        note = f"{peers.THREADS} threads, our methods on {DEVICE}; {time.time() - t0:.0f} s so far."
        plot(summary, out)
        return write_run(out, record, {"rows": rows, "summary": summary}, markdown(summary), note=note)

    rows = run(args.tasks, args.quick, args.methods, tuple(args.skip), save)
    print(save(rows))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
