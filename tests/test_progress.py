"""Progress that means something: a planned share done, a time left, a bar that ends at 100 %."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_register import iter_register
from napari_register.coords import Geometry
from napari_register.image import Image
from napari_register.methods.registry import get_method
from napari_register.progress import Progress, Stage, Tracker, format_seconds, seconds_scale

pytestmark = pytest.mark.usefixtures("one_thread")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_tracker_weights_stages_by_planned_time_and_ends_at_one():
    clock = Clock()
    tr = Tracker([Stage("a", 10, 1.0), Stage("b", 2, 3.0)], scale=2.0, clock=clock)
    assert tr.estimate == 8.0
    p = tr.update(Progress("a 5x5", 2, 10))  # a fifth of stage a: 0.2 s of 4 planned
    assert p.fraction == pytest.approx(0.05) and p.stage_index == 1 and p.stages == 2
    assert p.eta == pytest.approx(8.0 * 0.95)  # under a tenth done: the plan's time left
    clock.t = 2.0
    tr.update(Progress("a 5x5", 10, 10))  # stage a ends at its last report (2 s)...
    clock.t = 3.0
    p = tr.update(Progress("b", 1, 2))  # ...and b's first step took the second after it  # a new stage label moves to the next planned stage
    assert p.fraction == pytest.approx(2.5 / 4) and p.stage_index == 2
    assert p.eta == pytest.approx(3.0 * (1 - 0.625) / 0.625)  # measured pace once past a tenth
    clock.t = 4.0
    done = tr.update(Progress("done", 1, 1))
    assert done.fraction == 1.0 and done.eta == 0.0
    assert [label for label, _ in tr.timings] == ["a 5x5", "b"]
    assert [t for _, t in tr.timings] == pytest.approx([2.0, 2.0])
    assert "100%" in str(done) and "[2/2]" in str(done)


def test_scale_and_formatting():
    assert seconds_scale("cpu", 2) == 1.0 and seconds_scale("cpu", 1) == 2.0 and seconds_scale("cpu", 64) == 0.25
    assert seconds_scale("cuda", 8) is None
    assert format_seconds(7.4) == "7 s" and format_seconds(125) == "2 min 05 s" and format_seconds(3780) == "1 h 03 min"
    assert "unknown" in str(Progress("estimate", 0, 0)) and "about 12 s" in str(Progress("estimate", 0, 0, eta=12))


def _pair() -> tuple[Image, Image]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    fixed = np.exp(-((yy - 24) ** 2 + (xx - 22) ** 2) / 80.0) + 0.05 * rng.random((48, 48))
    moving = np.roll(fixed, 2, axis=1)
    g = Geometry.default((48, 48))
    return Image(moving.astype(np.float32), g), Image(fixed.astype(np.float32), g)


@pytest.mark.parametrize("method, io_steps", [("optimize", 0), ("optimize", 3), ("carl", 2)])
def test_run_follows_its_plan_to_100_percent(method, io_steps):
    """The estimate comes first, the bar never goes back and ends at exactly 100 %, and every planned
    stage is one stage of the run (a method whose plan disagrees with its loop fails here)."""
    moving, fixed = _pair()
    gen = iter_register(moving, fixed, method=method, io_steps=io_steps, device="cpu")
    seen = []
    while True:
        try:
            seen.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    seen = [p for p in seen if p.stage != "note"]
    assert seen[0].stage == "estimate" and seen[0].eta is not None and seen[0].eta > 0
    fractions = [p.fraction for p in seen[1:]]
    assert all(f is not None for f in fractions)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and seen[-1].stage == "done"
    assert all(p.eta is not None and p.eta >= 0 for p in seen[1:])
    stages = [p.stage for p in seen[1:-1]]
    distinct = [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]]
    assert len(distinct) == seen[1].stages == len(result.timings), (distinct, seen[1].stages)
    assert [label for label, _ in result.timings] == distinct


def test_cpu_runs_network_alone_by_default():
    carl = get_method("carl")
    assert carl.io_steps_default(torch.device("cpu")) == 0
    assert carl.io_steps_default(torch.device("cuda")) == carl.default_io_steps > 0
    assert get_method("optimize").io_steps_default(torch.device("cpu")) == 0
