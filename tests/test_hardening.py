"""The pipeline under pressure, for every method: too little memory (a coarser grid, the CPU, or a
refusal with the numbers), CUDA running out mid-run (the CPU takes over), Cancel (no step after
it), and a seeded CPU run repeated bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from corpus_files import volume
from napari_register import Cancelled, register
from napari_register import resources
from napari_register.api import iter_register
from napari_register.coords import Geometry
from napari_register.errors import ResourceError
from napari_register.image import Image
from napari_register.methods.registry import get_method

FAST = {"optimize": {"levels": [2, 1], "iterations": [4, 4], "affine_iterations": 3},
        "carl": {"affine_iterations": 3}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pair(shape: tuple[int, ...]) -> tuple[Image, Image]:
    g = Geometry.default(shape)
    return Image(volume(shape, shift=2), g, path="moving"), Image(volume(shape), g, path="fixed")


# ------------------------------------------------------------------------------------ memory

def test_too_little_memory_gives_a_coarser_grid_with_a_note(monkeypatch):
    moving, fixed = pair((32, 32, 32))
    options = {"levels": [1], "iterations": [2], "affine_iterations": 0}  # finest level = working grid
    method = get_method("optimize")(3, torch.device("cpu"), None, **options)
    voxels = 32 ** 3
    full = method.memory_bytes((32, 32, 32), 0) + resources.HOLD_BYTES * voxels
    monkeypatch.setattr(resources, "OVERHEAD", 0)
    monkeypatch.setattr(resources, "available", lambda device: int(0.8 * full))
    steps: list = []
    result = register(moving, fixed, options=options, device="cpu", progress=steps.append)
    notes = [p.message for p in steps if p.stage == "note"]
    assert len(notes) == 1 and "working at" in notes[0] and "32x32x32" in notes[0], notes
    assert result.notes == notes
    assert max(result.output.map.shape[2:]) < 32  # the method ran coarser ...
    assert result.field.disp.shape[:3] == (32, 32, 32)  # ... and the result is on the fixed grid


def test_refused_with_the_numbers_when_nothing_fits(monkeypatch):
    moving, fixed = pair((32, 32, 32))
    monkeypatch.setattr(resources, "available", lambda device: 1_000_000)
    with pytest.raises(ResourceError, match=r"32x32x32 voxels\) needs ~.*MB of RAM.*only 1.0 MB are free"):
        register(moving, fixed, options=FAST["optimize"], device="cpu")
    # the outputs fit but the method does not, even at its coarsest grid
    monkeypatch.setattr(resources, "OVERHEAD", 0)
    monkeypatch.setattr(resources, "OUTPUT_BYTES", 0)
    monkeypatch.setattr(resources, "HOLD_BYTES", 0)
    with pytest.raises(ResourceError, match=r"needs ~.* which has 1.0 MB free; even at .* Close other programs"):
        register(moving, fixed, method="carl", options=FAST["carl"], io_steps=2, device="cpu")


def test_short_cuda_moves_to_the_cpu(monkeypatch):
    method = get_method("carl")(3, torch.device("cpu"))
    monkeypatch.setattr(resources, "available", lambda d: 10_000_000 if torch.device(d).type == "cuda" else 10 ** 12)
    plan = resources.plan_run(method, (64, 64, 64), (1.0, 1.0, 1.0), (64, 64, 64), 50, torch.device("cuda"))
    assert plan.device.type == "cpu" and plan.shape == (64, 64, 64)
    assert "CUDA, which has 10.0 MB free; running on the CPU instead" in plan.notes[0]


@pytest.mark.parametrize("method", ["optimize", "carl"])
def test_cuda_out_of_memory_mid_run_falls_back_to_the_cpu(method, monkeypatch):
    """A fake accelerator ("meta": tensors without data) whose method runs out of memory as CUDA would."""
    cls = get_method(method)
    real = cls.iter_run

    def iter_run(self, moving, fixed, io_steps, init=None):
        if fixed.device.type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return (yield from real(self, moving, fixed, io_steps, init))
    monkeypatch.setattr(cls, "iter_run", iter_run)
    moving, fixed = pair((32, 32))
    result = register(moving, fixed, method=method, device=torch.device("meta"), options=FAST[method], io_steps=2)
    assert result.device == "cpu"
    assert any("ran out of memory" in n and "running on the CPU instead" in n for n in result.notes), result.notes
    assert np.isfinite(result.field.disp).all()


# ------------------------------------------------------------------------------------ cancel

@pytest.mark.parametrize("method, stage", [("optimize", "optimize level 2/2"), ("carl", "instance optimisation")])
def test_cancel_stops_before_the_next_step(method, stage):
    """Cancel is polled before every step: once it is set, not one more step is computed, whether
    ``optimize`` or a network's instance optimisation is running."""
    moving, fixed = pair((32, 32))
    cancelled = False
    after = []
    gen = iter_register(moving, fixed, method=method, device="cpu", options=FAST[method], io_steps=50,
                        cancel=lambda: cancelled)
    with pytest.raises(Cancelled):
        for p in gen:
            if cancelled:
                after.append(p)
            elif p.stage.startswith(stage) and p.step == 2:
                cancelled = True  # the user presses Cancel while step 2's progress is shown
    assert after == [], [str(p) for p in after]


# ------------------------------------------------------------------------------------ repeatability

@pytest.mark.parametrize("method, shape, io", [("optimize", (16, 16, 16), 0), ("carl", (32, 32), 3)])
def test_seeded_cpu_run_repeats_bit_for_bit(method, shape, io):
    moving, fixed = pair(shape)
    fields = []
    for _ in range(2):
        torch.manual_seed(0)
        result = register(moving, fixed, method=method, device="cpu", options=FAST[method], io_steps=io)
        fields.append(result.field.disp)
    assert np.array_equal(fields[0], fields[1])
