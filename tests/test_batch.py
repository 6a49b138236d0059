"""Cohort registration on a real Dask LocalCluster: same results as pair by pair, bad pairs reported,
resume, a worker killed mid-run."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

distributed = pytest.importorskip("distributed")

from napari_register.batch import read_pairs_csv, register_many  # noqa: E402
from napari_register.cli import main  # noqa: E402
from napari_register.coords import Geometry  # noqa: E402
from napari_register.image import Image, read_image, write_image  # noqa: E402
from napari_register.outputs import PairFiles, is_done, register_to_folder  # noqa: E402

FAST = {"levels": [2, 1], "iterations": [6, 4], "affine_iterations": 5}


def _blob(shift: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[:40, :40].astype(np.float32)
    img = np.exp(-((yy - 20 - shift[0]) ** 2 + (xx - 18 - shift[1]) ** 2) / 60.0)
    return img + 0.5 * np.exp(-((yy - 10 - shift[0]) ** 2 + (xx - 28 - shift[1]) ** 2) / 20.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four small 2D pairs with label maps, on disk."""
    d = tmp_path_factory.mktemp("cohort")
    g = Geometry((40, 40), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    pairs = []
    for i in range(4):
        fixed, moving = _blob((0, 0)), _blob((i + 1, -i))
        for name, img in ((f"f{i}", fixed), (f"m{i}", moving)):
            write_image(Image(img.astype(np.float32), g), d / f"{name}.nii.gz")
            write_image(Image((img > 0.5).astype(np.uint8), g), d / f"{name}_seg.nii.gz")
        pairs.append({"moving": str(d / f"m{i}.nii.gz"), "fixed": str(d / f"f{i}.nii.gz"),
                      "moving_labels": str(d / f"m{i}_seg.nii.gz"), "fixed_labels": str(d / f"f{i}_seg.nii.gz"),
                      "name": f"pair{i}"})
    return d, pairs


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  memory_limit=None) as cluster, distributed.Client(cluster) as c:
        yield c


def test_batch_matches_pair_by_pair_and_reports_a_bad_pair(cohort, client, tmp_path):
    d, pairs = cohort
    bad = {"moving": str(d / "nope.nii.gz"), "fixed": pairs[0]["fixed"], "name": "broken"}
    table = register_many(pairs[:3] + [bad], tmp_path / "out", options=FAST, client=client)
    rows = table.to_dict("records")
    assert [r["name"] for r in rows] == ["pair0", "pair1", "pair2", "broken"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert "nope.nii.gz" in rows[3]["error"]
    import torch

    torch.set_num_threads(1)  # as on the single-threaded workers
    for pair, row in zip(pairs[:3], rows):
        fields = {k: v for k, v in pair.items() if k != "name"}
        alone = register_to_folder(PairFiles(**fields), tmp_path / "alone" / pair["name"], options=FAST)
        assert row["dice_mean"] == pytest.approx(alone["dice_mean"], abs=1e-9)
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / where / pair["name"] / "displacement.nii.gz")))
                for where in ("out", "alone"))
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert row["dice_mean"] > row["dice_mean_before"]  # it registered
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("name,status") and len(summary) == 1 + 4 + 3  # pairs, mean/median/worst
    assert (tmp_path / "out" / "summary.png").stat().st_size > 0
    assert "1 failed" in (tmp_path / "out" / "summary.md").read_text()


def test_resume_skips_finished_pairs_and_redoes_a_half_written_one(cohort, client, tmp_path):
    _, pairs = cohort
    out = tmp_path / "out"
    register_many(pairs[:2], out, options=FAST, client=client)
    stamp = (out / "pair0" / "metrics.json").stat().st_mtime_ns
    # pair1 stopped half-way: outputs present, no metrics.json; pair2, pair3 never started
    (out / "pair1" / "metrics.json").unlink()
    (out / "pair1" / "warped.nii.gz").write_bytes(b"half")
    table = register_many(pairs, out, options=FAST, client=client).to_dict("records")
    assert [r["status"] for r in table] == ["done (earlier run)", "done", "done", "done"]
    assert (out / "pair0" / "metrics.json").stat().st_mtime_ns == stamp  # not run again
    assert read_image(out / "pair1" / "warped.nii.gz").shape == (40, 40)  # rewritten whole
    assert all(is_done(out / f"pair{i}") for i in range(4))


def test_a_worker_killed_mid_run_and_the_job_still_finishes(cohort, tmp_path):
    _, pairs = cohort
    slow = {**FAST, "iterations": [300, 100]}  # long enough to be killed in the middle
    many = [{**p, "name": f"{p['name']}_{k}"} for k in range(2) for p in pairs]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  memory_limit=None) as cluster, distributed.Client(cluster) as c:
        result: dict = {}
        job = threading.Thread(target=lambda: result.update(table=register_many(many, tmp_path / "out", options=slow,
                                                                                client=c)))
        job.start()
        deadline = time.time() + 120
        while not any(c.processing().values()) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a pair is half-way through
        busy = [w for w, tasks in c.processing().items() if tasks]
        pid = c.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        job.join(timeout=600)
    rows = result["table"].to_dict("records")
    assert [r["status"] for r in rows] == ["done"] * len(many)
    for r in rows:
        folder = tmp_path / "out" / r["name"]
        assert is_done(folder)
        metrics = json.loads((folder / "metrics.json").read_text())
        for name in metrics["outputs"]:
            if name.endswith(".nii.gz"):
                assert sitk.ReadImage(str(folder / name)).GetSize()[:2] == (40, 40)  # every file whole
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left


def test_csv_and_the_command(cohort, tmp_path):
    d, pairs = cohort
    csv_path = tmp_path / "pairs.csv"
    lines = ["moving,fixed,moving_labels,fixed_labels,name"]
    lines += [f"{p['moving']},{p['fixed']},{p['moving_labels']},{p['fixed_labels']},{p['name']}" for p in pairs[:2]]
    csv_path.write_text("\n".join(lines) + "\n")
    assert [r["name"] for r in read_pairs_csv(csv_path)] == ["pair0", "pair1"]
    bad = tmp_path / "bad.csv"
    bad.write_text("mov,fixed\na,b\n")
    with pytest.raises(ValueError, match="columns moving,fixed"):
        read_pairs_csv(bad)
    code = main(["batch", str(csv_path), "--out", str(tmp_path / "res"), "--workers", "1", "--quiet",
                 "--options", json.dumps(FAST)])
    assert code == 0 and all(is_done(tmp_path / "res" / f"pair{i}") for i in range(2))
    code = main(["batch", "--template", pairs[0]["fixed"], pairs[1]["moving"], pairs[2]["moving"],
                 "--out", str(tmp_path / "tpl"), "--workers", "1", "--quiet", "--options", json.dumps(FAST)])
    assert code == 0 and sorted(p.name for p in (tmp_path / "tpl").iterdir() if p.is_dir()) == ["m1_to_f0", "m2_to_f0"]
