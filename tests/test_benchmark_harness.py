"""The benchmark package (``python -m benchmarks``) and its harness on the real data: unregistered
scores match the figures measured with the peers' own tools (a harness bug would show here first).
The real-data tests skip without ../shared/data."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_register.data import PROSTATE_PAIRS, skip_reason

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the benchmarks package lives in the clone, not in the installed product
import benchmarks  # noqa: E402
from benchmarks import photos  # noqa: E402
from benchmarks.__main__ import COMMANDS  # noqa: E402
from benchmarks.__main__ import main as bench_main  # noqa: E402
from benchmarks.tasks import cases  # noqa: E402

needs_data = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def test_every_command_has_help(capsys):
    """``python -m benchmarks --help`` lists the commands, and each one answers ``--help``."""
    assert bench_main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in COMMANDS:
        assert name in listing
        with pytest.raises(SystemExit) as stop:
            bench_main([name, "--help"])
        assert stop.value.code == 0
        assert f"python -m benchmarks {name}" in capsys.readouterr().out


def test_cases_come_from_the_holdout_list():
    """The benchmark evaluates exactly the cases the product's data package holds out of training."""
    names = [c.name for c in cases("prostate")]
    assert names == [f"prostate_{m:02d}_to_{f:02d}" for m, f in PROSTATE_PAIRS]


def test_results_index_names_every_run(tmp_path):
    """Every run folder is listed in benchmarks/results/README.md, and a new run gets a fresh folder."""
    index = (benchmarks.RESULTS / "README.md").read_text()
    runs = [d.name for d in benchmarks.RESULTS.iterdir() if d.is_dir()]
    assert runs
    assert [r for r in runs if not re.search(rf"\b{re.escape(r)}\b", index)] == []
    first, second = benchmarks.new_run_dir("quick", tmp_path), benchmarks.new_run_dir("quick", tmp_path)
    assert first != second and first.is_dir() and second.name == first.name + "-2"


@needs_data
@pytest.mark.parametrize("task, metric, expected", [("oasis", "dice", 0.639), ("prostate", "dice", 0.545),
                                                    ("mr_us", "dice", 0.476), ("histology", "tre", 117.4)])
def test_unregistered_scores(task, metric, expected):
    from benchmarks import peers

    vals = [peers.run_peer("identity", c)[metric] for c in cases(task)]
    assert np.mean(vals) == pytest.approx(expected, abs=0.002 if metric == "dice" else 0.5)


@needs_data
def test_small_structure_dice_scores_the_landmark_regions_and_validation_pairs_are_not_benchmark_pairs():
    """Warping a label set onto itself scores 1; the identity between subjects scores the small
    landmark regions far below the gland (they are the hard, small structures)."""
    import SimpleITK as sitk

    from benchmarks import peers
    from benchmarks.tasks import evaluate, load

    pair = load(cases("prostate")[0])
    own = [sitk.GetArrayFromImage(lab) for lab in pair.fixed_labels]
    assert evaluate(pair, own)["dice_small"] == pytest.approx(1.0)
    rows = [peers.run_peer("identity", c) for c in cases("prostate")]
    small, gland = np.mean([r["dice_small"] for r in rows]), np.mean([r["dice"] for r in rows])
    assert 0 <= small < gland
    val = {c.name.split("_", 2)[-1] for c in cases("prostate_val")}
    bench = {c.name.split("_", 1)[-1] for c in cases("prostate")}
    assert val and not val & bench
    numbers = {int(n) for name in val for n in name.split("_to_")}
    assert not numbers & {n for pair in PROSTATE_PAIRS for n in pair}


def test_photo_cases_have_the_true_homography():
    """moving(H x) == fixed(x) inside the patch, and identity scores the true corner offsets."""
    pytest.importorskip("skimage", reason="the photo task reads scikit-image's bundled photos")
    pc = photos.cases("clean", n=1)[0]
    ys, xs = np.mgrid[40:150:7, 40:150:7]
    pts = np.c_[xs.ravel(), ys.ravel(), np.ones(xs.size)] @ pc.truth.T
    pts = pts[:, :2] / pts[:, 2:]
    from scipy.ndimage import map_coordinates

    moved = map_coordinates(pc.moving, [pts[:, 1], pts[:, 0]], order=1)
    assert np.abs(moved - pc.fixed[ys.ravel(), xs.ravel()]).mean() < 0.02
    assert 5 < photos.mace(lambda p: p, pc.truth) < 2 * photos.RHO


def test_whole_command_peak_memory_is_the_commands_own():
    """A command that allocates 200 MB reads >= 200 MB, one that allocates nothing < 50 MB, although
    this process has held more than either (started from here directly, both would read its peak)."""
    from benchmarks.e2e import measure

    held = np.ones(300 * 2 ** 20 // 8)  # this process's high-water mark: >= 300 MB
    del held
    big = measure([sys.executable, "-c", "import numpy as np; a = np.ones(200 * 2 ** 20 // 8)"])
    small = measure([sys.executable, "-S", "-c", "pass"])
    assert big.returncode == small.returncode == 0
    assert big.peak_mb >= 200 and small.peak_mb < 50
    assert 0 < small.seconds < big.seconds


def test_harness_peak_counts_memory_reused_from_an_earlier_run():
    """The in-process harness's peak (``peers._PeakRSS``) counts 200 MB allocated in the block even
    when malloc still holds that much freed by an earlier run (the old RSS sampler read 0 MB), and an
    empty block reads ~0."""
    from benchmarks.peers import _PeakRSS

    def chunks() -> list:
        return [np.ones(12_000) for _ in range(2200)]  # 2200 x 94 KiB, from malloc's heap

    earlier = chunks()
    above = np.ones(12_000)  # keeps the freed chunks below it inside the heap
    del earlier
    with _PeakRSS() as run:
        now = chunks()
    del now
    with _PeakRSS() as empty:
        pass
    del above
    if run.mb is None:
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    assert run.mb >= 195 and empty.mb < 5


def test_ran_heldout_fold_fraction_counts_flipped_voxels():
    import torch

    from benchmarks.ran_heldout import fold_fraction

    zero = torch.zeros(1, 3, 6, 7, 8)
    assert fold_fraction(zero) == 0.0
    z = torch.arange(6, dtype=torch.float32).view(6, 1, 1).expand(6, 7, 8)
    mirrored = zero.clone()
    mirrored[0, 0] = -2 * z  # x -> -x along axis 0: det = -1 everywhere
    assert fold_fraction(mirrored) == 1.0
    half = zero.clone()
    half[0, 0, 3:] = -2 * z[3:]  # only the far half flips (the seam voxels stretch or fold)
    assert 0.3 < fold_fraction(half) < 0.7
