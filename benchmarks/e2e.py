"""End to end: whole commands timed from process start to exit, with each one's exact peak memory.

What the user waits for, imports, reading and writing included.

    python -m benchmarks e2e [--task oasis] [--repeat 3] [--commands optimize carl demo ants_synonly ...]
                             [--threads 2] [--device cpu] [--breakdown] [--out DIR]

Ours: ``napari-register register MOVING FIXED --out DIR --method M --quiet`` (M: optimize, carl;
the CLI's defaults otherwise) and ``napari-register demo --out DIR --quiet``. The peers as whole
commands doing the same work: ``python -m benchmarks.peer_cli PEER MOVING FIXED DIR`` (the
harness's runner and settings; writes the warped image and the displacement field). Each command
runs ``--repeat`` times in interleaved rounds (a load on the machine falls on every command
alike); the table gives min / median / max seconds, the median against ANTs SyNOnly's and the
peak resident memory of the process (the most over the runs). Every command gets ``--threads``
threads (torch, ITK, OpenMP), as the harness gives the peers; 0 leaves each tool its default.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
PEERS = ("ants_synonly", "ants_syn", "elastix_bspline", "elastix_affine_bspline", "sitk_demons")
DEFAULT = ("optimize", "carl", "demo", *PEERS)  # a peer that does not apply to the task is left out
REFERENCE = "ants_synonly"

# A small fresh Python starts the command and reaps it. Started from this process instead, the
# command's ru_maxrss would be at least this process's own peak: Linux carries the high-water mark
# of the parent's memory into the child through vfork + exec (`python -c pass` read 326 MB from a
# parent that had once held 326 MB; through this launcher it reads 11 MB).
_LAUNCHER = """\
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": seconds, "returncode": os.waitstatus_to_exitcode(status),
               "maxrss_kib": usage.ru_maxrss}, f)
"""


@dataclass
class Measurement:
    """One run of a command: ``seconds`` from start to exit, ``peak_mb`` its peak resident memory
    (MiB; ``ru_maxrss`` of the process and of any it waited for), its exit code and output."""

    seconds: float
    peak_mb: float
    returncode: int
    stdout: str = ""
    stderr: str = ""


def measure(argv: Sequence[str], env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> Measurement:
    """Run ``argv`` once and measure it (see :data:`_LAUNCHER`)."""
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        result = Path(tmp) / "result.json"
        p = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(result), *argv], env=env, cwd=cwd,
                           capture_output=True, text=True)
        if not result.exists():
            raise RuntimeError(f"could not start {argv[0]}: {p.stderr.strip().splitlines()[-1:]}")
        r = json.loads(result.read_text())
    return Measurement(r["seconds"], r["maxrss_kib"] / 1024, r["returncode"], p.stdout, p.stderr)


@dataclass
class Command:
    """A command to time; ``{out}`` in ``argv`` is a fresh output folder for every run."""

    name: str
    argv: list[str]
    runs: list[Measurement] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # each run's metrics.json

    def shown(self) -> str:
        """The command as typed, files by name only (the full paths are in results.json)."""
        def short(a: str) -> str:
            return a if a == sys.executable or not os.path.isabs(a) else Path(a).name
        words = ["python" if a == sys.executable else short(a) for a in self.argv]
        return " ".join(w.replace("{out}", "DIR") for w in words)


def our_cli() -> str:
    """The ``napari-register`` console script of this environment (the one a user runs)."""
    beside = Path(sys.executable).parent / "napari-register"
    found = str(beside) if beside.exists() else shutil.which("napari-register")
    if not found:
        raise SystemExit("napari-register is not installed in this environment (pip install -e .)")
    return found


def build(names: Sequence[str], case: Any, device: Optional[str]) -> tuple[list[Command], list[str]]:
    """The commands for ``names`` on ``case`` (a :class:`benchmarks.tasks.Case`), and notes on those
    left out (a peer not meant for the case)."""
    from benchmarks.peers import RUNNERS
    from napari_register.methods.registry import list_methods

    unknown = set(names) - {"demo", *RUNNERS, *list_methods()}
    if unknown:
        raise SystemExit(f"unknown commands {sorted(unknown)}: our methods ({', '.join(list_methods())}), demo, "
                         f"or peers ({', '.join(RUNNERS)})")
    cli, dev = our_cli(), (["--device", device] if device else [])
    out, notes = [], []
    if case.dim == 2:
        notes.append(f"the peers read the photos block-averaged by {case.shrink} (as the harness does), ours the "
                     "full-size files")
    for name in names:
        if name == "demo":
            argv = [cli, "demo", "--out", "{out}", "--quiet", *dev]
        elif name in RUNNERS:
            if not RUNNERS[name].applies(case):
                notes.append(f"{name} left out: not meant for {case.task} ({case.dim}D, "
                             f"{'multi' if case.multimodal else 'mono'}modal)")
                continue
            photo = ["--photo", str(case.shrink)] if case.dim == 2 else []
            argv = [sys.executable, "-m", "benchmarks.peer_cli", name, str(case.moving), str(case.fixed), "{out}",
                    *photo]
        else:  # one of our methods, with the CLI's defaults
            argv = [cli, "register", str(case.moving), str(case.fixed), "--out", "{out}", "--method", name,
                    "--quiet", *dev]
        out.append(Command(name, argv))
    return out, notes


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    if threads > 0:
        n = str(threads)
        env.update(NAPARI_REGISTER_BENCH_THREADS=n, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=n, OMP_NUM_THREADS=n)
    return env


def run_once(cmd: Command, scratch: Path, env: dict[str, str],
             extra: Sequence[str] = ()) -> tuple[Measurement, Optional[dict[str, Any]]]:
    """One run of ``cmd`` (plus ``extra`` arguments) into a fresh folder under ``scratch``, removed
    after (only the time counts); with the run's ``metrics.json`` where it wrote one."""
    out = Path(tempfile.mkdtemp(dir=scratch)) / "out"
    try:
        m = measure([a.replace("{out}", str(out)) for a in cmd.argv] + list(extra), env, REPO)
        try:
            return m, json.loads((out / "metrics.json").read_text())
        except (OSError, ValueError):
            return m, None
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def breakdown(commands: list[Command], scratch: Path, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """One more run of each of our commands with ``--profile`` (its stderr: where the time goes),
    where the CLI has the flag; notes for those without it."""
    cli = our_cli()
    out: dict[str, str] = {}
    notes = []
    for cmd in commands:
        if cmd.argv[0] != cli:
            continue
        helptext = subprocess.run([cli, cmd.argv[1], "--help"], capture_output=True, text=True).stdout
        if "--profile" not in helptext:
            notes.append(f"{cmd.name}: `napari-register {cmd.argv[1]}` has no `--profile` yet, no breakdown")
            continue
        m, _ = run_once(cmd, scratch, env, ["--profile"])
        out[cmd.name] = m.stderr.strip() if m.returncode == 0 else f"failed (exit {m.returncode}): {m.stderr[-500:]}"
    return out, notes


def summarise(commands: list[Command]) -> list[dict[str, Any]]:
    rows = []
    for c in commands:
        ok = [m for m in c.runs if m.returncode == 0]
        row: dict[str, Any] = {"name": c.name, "command": c.shown(), "argv": c.argv, "runs": len(c.runs),
                               "failed": len(c.runs) - len(ok)}
        if ok:
            s = [m.seconds for m in ok]
            row.update(min_s=min(s), median_s=statistics.median(s), max_s=max(s), all_s=s,
                       peak_mb=max(m.peak_mb for m in ok), all_peak_mb=[m.peak_mb for m in ok])
        reg = [m["seconds"] for m in c.metrics if "seconds" in m]
        if reg:
            row["registration_median_s"] = statistics.median(reg)
            row["device"] = ", ".join(sorted({str(m.get("device")) for m in c.metrics}))
        errors = [m.stderr.strip()[-300:] for m in c.runs if m.returncode != 0]
        if errors:
            row["error"] = errors[-1]
        rows.append(row)
    ref = next((r for r in rows if r["name"] == REFERENCE and "median_s" in r), None)
    for r in rows:
        if ref is not None and "median_s" in r:
            r["x_ants_synonly"] = r["median_s"] / ref["median_s"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| command | runs (failed) | min s | median s | max s | x ANTs SyNOnly (median) | peak MB | "
             "registration s (median, metrics.json) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k: str, fmt: str) -> str:
            return format(r[k], fmt) if k in r else "-"
        lines.append(f"| `{r['command']}` | {r['runs']} ({r['failed']}) | {f('min_s', '.1f')} | "
                     f"{f('median_s', '.1f')} | {f('max_s', '.1f')} | {f('x_ants_synonly', '.2f')} | "
                     f"{f('peak_mb', '.0f')} | {f('registration_median_s', '.1f')} |")
    errors = [f"- {r['name']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else []))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks e2e", description=__doc__.splitlines()[0],
                                 epilog="Results: a new benchmarks/results/<date>-e2e[-TASK]/ unless --out.")
    ap.add_argument("--task", default="oasis", help="a task of benchmarks.tasks (oasis, prostate, mr_us, histology)")
    ap.add_argument("--case", type=int, default=0, help="which case of the task (index; default the first)")
    ap.add_argument("--commands", nargs="+", default=list(DEFAULT),
                    help=f"our methods, demo, peers (default: {' '.join(DEFAULT)})")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command (interleaved rounds)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("NAPARI_REGISTER_BENCH_THREADS", "2")),
                    help="threads of every command (torch, ITK, OpenMP); 0: each tool's default")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"],
                    help="passed to our commands (default: none, the CLI's own: auto)")
    ap.add_argument("--breakdown", action="store_true",
                    help="one more run of ours with --profile, its stderr kept (where the CLI has --profile)")
    ap.add_argument("--out", type=Path, help="run folder (default: a new benchmarks/results/<date>-e2e[-TASK])")
    args = ap.parse_args(argv)

    from benchmarks import new_run_dir, provenance, write_run
    from benchmarks.tasks import cases
    from napari_register.data import skip_reason

    if skip_reason():
        raise SystemExit(skip_reason())
    record = provenance("e2e", argv)
    case = cases(args.task)[args.case]
    commands, notes = build(args.commands, case, args.device)
    env = child_env(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="napari-register-e2e-"))
    try:
        for r in range(args.repeat):
            for cmd in commands:
                m, metrics = run_once(cmd, scratch, env)
                cmd.runs.append(m)
                if metrics is not None:
                    cmd.metrics.append(metrics)
                print(f"round {r + 1}/{args.repeat} {cmd.name}: {m.seconds:.1f} s, peak {m.peak_mb:.0f} MB"
                      + (f", exit {m.returncode}" if m.returncode else ""), flush=True)
        profiles, missing = breakdown(commands, scratch, env) if args.breakdown else ({}, [])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = summarise(commands)
    text = [f"Case `{case.name}` (`{Path(case.moving).name}` -> `{Path(case.fixed).name}`); the demo registers "
            "the shipped sample pair instead. Whole commands from process start to exit, "
            f"{args.repeat} interleaved rounds; threads per command: {args.threads or 'each tool default'}.",
            "", markdown(rows)]
    text += [""] + [f"- {n}" for n in notes + missing] if notes or missing else []
    for name, prof in profiles.items():
        text += ["", f"Breakdown of `{name}` (`--profile`, one more run):", "", "```", prof, "```"]
    out = args.out or new_run_dir("e2e" if args.task == "oasis" else f"e2e-{args.task}")
    data = {"task": args.task, "case": case.name, "repeat": args.repeat, "threads": args.threads, "rows": rows,
            "breakdown": profiles, "notes": notes + missing}
    md = write_run(out, record, data,
                   "\n".join(text), title="End to end: whole commands, as the user waits for them",
                   note="Peak MB: the process's own peak resident memory (ru_maxrss), the most over the runs.")
    print(md)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
