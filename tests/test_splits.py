"""The broad benchmark's dev/test split (napari_register.data.splits): disjoint where it must be,
the networks never scored on what they train on, and a quick run of the benchmark itself."""
from __future__ import annotations

import json

import pytest

from napari_register.data import HOLDOUT, skip_reason, splits


def test_prostate_and_mr_us_splits_share_no_subject():
    dev, test = (set(splits.PROSTATE_CASES[s]) for s in splits.SPLITS)
    assert not dev & test and len(dev | test) == 14
    assert len(splits.prostate_pairs("test")) == 6 * 5 and len(splits.prostate_pairs("dev")) == 8 * 7
    assert test <= HOLDOUT.prostate_cases  # no network trains on a test subject
    mr_dev, mr_test = (set(splits.mr_us_cases(s)) for s in splits.SPLITS)
    assert not mr_dev & mr_test and mr_dev | mr_test == set(range(25))


def test_brain_and_histology_splits_cover_every_ordered_pair_once():
    brains = splits.brain_pairs("dev") + splits.brain_pairs("test")
    assert len(brains) == len(set(brains)) == 12 and all(m != f for m, f in brains)
    stains = splits.histology_pairs("dev") + splits.histology_pairs("test")
    assert len(stains) == len(set(stains)) == 20
    assert {f for _, f in splits.histology_pairs("dev")}.isdisjoint(f for _, f in splits.histology_pairs("test"))
    with pytest.raises(ValueError, match="unknown split 'train'"):
        splits.prostate_pairs("train")


def test_seen_in_training_follows_the_holdout_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_REGISTER_DATA", str(tmp_path))
    held = tmp_path / "prostate3d/unpaired_train/images/case000009.nii.gz"
    trained = tmp_path / "prostate3d/unpaired_train/images/case000019.nii.gz"
    oasis = tmp_path / "brain3d/oasis_pair/image_A_160x192x144.nii.gz"
    mni = tmp_path / "mni/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    assert not splits.seen_in_training([held, oasis])
    assert splits.seen_in_training([held, trained]) and splits.seen_in_training([oasis, mni])
    assert not splits.seen_in_training([tmp_path.parent / "elsewhere.png"])


@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_the_broad_benchmark_quick_run_scores_against_the_start(tmp_path):
    from benchmarks import broad

    broad.main(["--split", "dev", "--quick", "--tasks", "prostate_pairs", "histology_pairs",
                "--methods", "optimize", "carl", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    rows, summary = data["rows"], {(s["task"], s["peer"]): s for s in data["summary"]}
    assert {r["split"] for r in rows} == {"dev"}
    for task in ("prostate_pairs", "histology_pairs"):
        s = summary[(task, "optimize")]
        assert s["pairs"] == broad.QUICK_PAIRS and {"mean", "median", "tail", "failures"} <= set(s)
        assert summary[(task, "identity")]["pairs"] == broad.QUICK_PAIRS
    # CARL trains on prostate cases 19-24: only the quick pairs among held-out cases are scored
    carl_cases = [r["case"] for r in rows if r["peer"] == "carl" and r["task"] == "prostate_pairs"]
    assert all(not any(f"{c:02d}" in name.split("_")[2:5:2] for c in (19, 22, 23, 24)) for name in carl_cases)
    assert "p10" in (tmp_path / "results.md").read_text()
