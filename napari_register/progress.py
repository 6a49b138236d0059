"""The bottom floor every long loop reports through: :class:`Progress` steps and :class:`Cancelled`,
and the run's plan (:class:`Stage`) that :class:`Tracker` turns into a share done and a time left."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


class Cancelled(RuntimeError):
    """Raised inside :func:`napari_register.api.iter_register` when its ``cancel`` hook returns True."""


@dataclass
class Progress:
    """One step of a running registration; ``map`` (working resolution) is set for live previews.

    Stages from :func:`napari_register.api.iter_register`: ``"note"`` (``message`` set), one
    ``"estimate"`` before the work (``eta``: the whole run's estimated seconds, None where no
    estimate exists), the method's own stages, ``"finishing"`` and a last ``"done"`` (fraction 1)."""

    stage: str
    step: int
    total: int
    loss: Optional[float] = None
    map: Any = None  # torch.Tensor (1, d, *working_shape) when set; typed loosely to keep torch out
    warped: Any = None  # set by the pipeline when previews are asked for (napari_register.previews)
    # A note for the user (stage "note"): something the run changed on their behalf (a lower working
    # resolution, the CPU instead of CUDA) or noticed about the inputs. Front ends show it as is.
    message: Optional[str] = None
    fraction: Optional[float] = None  # share of the whole run done, 0..1 (set by the pipeline)
    eta: Optional[float] = None  # seconds left (set by the pipeline; "estimate": the whole run)
    stage_index: Optional[int] = None  # which planned stage (1-based) of ``stages``
    stages: Optional[int] = None

    def __str__(self) -> str:
        if self.message is not None:
            return self.message
        if self.stage == "estimate":
            return "estimated time: unknown on this device" if self.eta is None else \
                f"estimated time: about {format_seconds(self.eta)}"
        where = f"[{self.stage_index}/{self.stages}] " if self.stage_index and self.stages else ""
        loss = "" if self.loss is None else f" loss {self.loss:.4f}"
        done = "" if self.fraction is None else f" {100 * self.fraction:3.0f}%"
        eta = "" if self.eta is None or self.stage == "done" else f" {format_seconds(self.eta)} left"
        return f"{where}{self.stage} {self.step}/{self.total}{loss}{done}{eta}"


def format_seconds(seconds: float) -> str:
    """``7 s``, ``2 min 05 s``, ``1 h 03 min``: what a person reads in a status line."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass(frozen=True)
class Stage:
    """One planned stage of a run: ``steps`` progress steps taking about ``seconds`` in all on the
    reference machine (:data:`REFERENCE_THREADS` CPU threads; see :func:`seconds_scale`)."""

    label: str
    steps: int
    seconds: float


# The methods' planned seconds were measured with torch on 2 CPU threads (docs/reliability.md).
REFERENCE_THREADS = 2


def seconds_scale(device_type: str, threads: int) -> Optional[float]:
    """Planned seconds -> this machine's: CPU time shrinks about with the thread count (at most 4x);
    None for other devices, whose times were not measured (the live pace still gives an ETA)."""
    if device_type != "cpu":
        return None
    return max(REFERENCE_THREADS / max(threads, 1), 0.25)


class Tracker:
    """Follows a run's progress steps along its plan: sets ``fraction``, ``eta`` and the stage index.

    Progress steps are matched to the plan by order: each change of ``stage`` moves to the next
    planned stage. ``scale`` turns planned seconds into this machine's (None: no absolute estimate;
    the plan's seconds still weight the stages). Once a tenth of the run is done, the time left
    comes from the measured pace instead of the plan. ``timings`` holds each stage's measured
    seconds."""

    def __init__(self, plan: Sequence[Stage], scale: Optional[float] = 1.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.plan = list(plan) or [Stage("run", 1, 1.0)]
        self.scale = scale
        self.clock = clock
        self.total = sum(s.seconds for s in self.plan) or 1.0
        self.index = -1
        self.stage: Optional[str] = None
        self.start = clock()
        self.stage_start = self.last = self.start
        self.timings: list[tuple[str, float]] = []

    @property
    def estimate(self) -> Optional[float]:
        """The whole run's estimated seconds on this machine (None where unknown)."""
        return None if self.scale is None else self.total * self.scale

    def _enter(self, stage: str) -> None:
        # A step is reported when it ends: the stage before ended at its last report, and the time
        # since then is this stage's first step.
        if self.stage is not None:
            self.timings.append((self.stage, self.last - self.stage_start))
            self.stage_start = self.last
        self.stage = stage
        self.index = min(self.index + 1, len(self.plan) - 1)

    def update(self, p: Progress) -> Progress:
        """Fill in ``p``'s fraction, eta and stage index; returns ``p``."""
        if p.stage in ("note", "estimate"):
            return p
        if p.stage == "done":
            self.finish()
            p.fraction, p.eta, p.stage_index, p.stages = 1.0, 0.0, len(self.plan), len(self.plan)
            return p
        if p.stage != self.stage:
            self._enter(p.stage)
        self.last = self.clock()
        before = sum(s.seconds for s in self.plan[:self.index])
        within = self.plan[self.index].seconds * (min(p.step, p.total) / max(p.total, 1))
        p.fraction = min((before + within) / self.total, 1.0)
        elapsed = self.clock() - self.start
        if p.fraction >= 0.1:
            p.eta = elapsed * (1.0 - p.fraction) / p.fraction
        elif self.scale is not None:
            p.eta = max(self.total * self.scale * (1.0 - p.fraction), 0.0)
        p.stage_index, p.stages = self.index + 1, len(self.plan)
        return p

    def finish(self) -> None:
        """Close the stage under way (its time goes to ``timings``)."""
        if self.stage is not None:
            self.last = self.clock()
            self.timings.append((self.stage, self.last - self.stage_start))
            self.stage = None
