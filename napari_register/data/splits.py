"""The broad benchmark's pairs, each task split once into ``dev`` (settings are chosen here) and
``test`` (results are reported here; never looked at while choosing).

Splits are by subject where the data allows it, so no test image is seen while choosing. Which pairs
a *trained* method may be scored on is not a list here: :func:`seen_in_training` asks the one
hold-out rule (:data:`napari_register.data.HOLDOUT`) whether training may read any file of a pair.
The benchmark (``benchmarks/broad.py``) and training both import from here.
"""
from __future__ import annotations

from itertools import permutations
from pathlib import Path
from typing import Iterable

from . import HOLDOUT, data_root

SPLITS = ("dev", "test")

# prostate3d/unpaired_train: inter-subject MR, every ordered pair among a split's cases. Dev holds
# the four cases the networks train on (19, 22, 23, 24) and four held-out ones; test only held-out.
PROSTATE_CASES = {"dev": (0, 1, 3, 8, 19, 22, 23, 24), "test": (9, 11, 12, 14, 17, 18)}

# prostate3d/paired_mr_us_train: moving MR -> fixed ultrasound. The networks train on 5-24, so
# they are scored on 0-4 only (in test); the untrained methods on all of test.
MR_US_CASES = {"dev": tuple(range(5, 15)), "test": (0, 1, 2, 3, 4) + tuple(range(15, 25))}

# Brains with tissue labels (GM = 1, WM = 2, derived from each one's own segmentation, see
# benchmarks/tasks.py): different sizes, spacings, crops and intensity ranges. Dev: the pairs with
# the MNI template; test: the inter-subject pairs (the OASIS pair both ways among them).
BRAINS = ("oasis_A", "oasis_B", "aseg", "mni")
BRAIN_PAIRS = {
    "dev": tuple(p for p in permutations(BRAINS, 2) if "mni" in p),
    "test": tuple(p for p in permutations(BRAINS, 2) if "mni" not in p),
}

# histology2d, CIMA lesion 1: every ordered stain pair (moving, fixed); split by the fixed stain.
STAINS = ("CD31-3", "Cc10-5", "He", "Ki67-7", "proSPC-4")
HISTOLOGY_FIXED = {"dev": ("He", "Cc10-5"), "test": ("CD31-3", "Ki67-7", "proSPC-4")}


def prostate_pairs(split: str) -> tuple[tuple[int, int], ...]:
    return tuple(permutations(_check(PROSTATE_CASES, split), 2))


def mr_us_cases(split: str) -> tuple[int, ...]:
    return _check(MR_US_CASES, split)


def brain_pairs(split: str) -> tuple[tuple[str, str], ...]:
    return _check(BRAIN_PAIRS, split)


def histology_pairs(split: str) -> tuple[tuple[str, str], ...]:
    fixed = _check(HISTOLOGY_FIXED, split)
    return tuple((m, f) for f in fixed for m in STAINS if m != f)


def _check(table: dict, split: str):
    if split not in table:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return table[split]


def seen_in_training(paths: Iterable[Path]) -> bool:
    """Whether training may read any of these files (a trained method is not scored on such a pair)."""
    root = data_root().resolve()
    for p in paths:
        try:
            rel = Path(p).resolve().relative_to(root).as_posix()
        except ValueError:
            continue  # not under the data root (photos made in memory)
        if not HOLDOUT.excludes(rel):
            return True
    return False
