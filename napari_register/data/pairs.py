"""The pair source of the deformable recipes: SynthMorph-style pairs mixed with real volumes.

Synthetic: one label-map image, two independently deformed (smooth random field + translation,
zeros outside) and corrupted copies. Real: two volumes of one group (brains or prostate MR), each
resampled onto the training grid through its own random deformation and translation. Batches are
``{"moving", "fixed"}``, each ``(B, 1, *shape)`` in [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch

from .. import coords
from . import HOLDOUT
from .synthmorph import corrupt, random_map, random_rigid_map, synthetic_image
from .volumes import RealVolumes


class PairSource:
    """Endless iterator of ``{"moving", "fixed"}`` batches, each ``(batch, 1, *shape)``."""

    def __init__(self, dim: int, shape: tuple[int, ...], batch: int = 1, real_fraction: float = 0.5,
                 seed: int = 0, root: Optional[Path] = None, real_shift: float = 0.15) -> None:
        if len(shape) != dim:
            raise ValueError(f"training shape {shape} is not {dim}D")
        self.dim, self.shape, self.batch = dim, tuple(shape), batch
        self.real_shift = float(real_shift)  # per-image translation of real volumes (norm units)
        self.gen = torch.Generator().manual_seed(seed)
        self.real = RealVolumes(root) if real_fraction > 0 else None
        self.real_fraction = real_fraction if self.real is not None and len(self.real) else 0.0

    def describe(self) -> dict:
        groups = {} if self.real is None else {k: len(v) for k, v in self.real.groups.items()}
        return {"synthetic": "SynthMorph-style label maps", "real_fraction": self.real_fraction,
                "real_volumes": groups, "real_files": [] if self.real is None else self.real.names, "shape": list(self.shape),
                "real_shift": self.real_shift,
                "excluded": {"prostate_cases": sorted(HOLDOUT.prostate_cases), "files": sorted(HOLDOUT.files)}}

    def supervised(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(moving, fixed, truth)``: one image (real or synthetic, as :meth:`one` draws) and a copy
        of it through a known rigid + smooth map (:func:`random_rigid_map`), each corrupted on its
        own; ``truth`` ``(1, d, *shape)`` is moving_norm_from_fixed_norm."""
        g = self.gen
        if float(torch.rand(1, generator=g)) < self.real_fraction:
            (base,) = self._real(1)
        else:
            base = synthetic_image(self.shape, g)
        truth = random_rigid_map(self.shape, g)
        return corrupt(base, g), corrupt(coords.sample(base, truth, padding_mode="zeros"), g), truth

    def one(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gen
        if float(torch.rand(1, generator=g)) < self.real_fraction:
            a, b = self._real(2)
        else:
            base = synthetic_image(self.shape, g)
            a = coords.sample(base, random_map(self.shape, g, 0.08, 0.1), padding_mode="zeros")
            b = coords.sample(base, random_map(self.shape, g, 0.08, 0.1), padding_mode="zeros")
        return corrupt(a, g), corrupt(b, g)

    def _real(self, k: int) -> list[torch.Tensor]:
        """``k`` real images of one group (same slicing axis in 2D), each a random crop and shift."""
        g = self.gen
        group = list(self.real.groups)[int(torch.randint(len(self.real.groups), (1,), generator=g))]
        vols = self.real.groups[group]
        picks = torch.randint(len(vols), (k,), generator=g).tolist()
        axis = None if self.dim == 3 else int(torch.randint(3, (1,), generator=g))
        return [self.real.sample(*vols[i], group, self.shape, g, axis, self.real_shift) for i in picks]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            pairs = [self.one() for _ in range(self.batch)]
            yield {"moving": torch.cat([p[0] for p in pairs]), "fixed": torch.cat([p[1] for p in pairs])}

    def supervised_batches(self, steps: int) -> Iterator[dict[str, torch.Tensor]]:
        """``steps`` batches of :meth:`supervised` pairs (``"truth"`` added), then unsupervised ones:
        a recipe that pre-trains on known fields for ``steps`` steps, then on pairs alone."""
        for _ in range(steps):
            trip = [self.supervised() for _ in range(self.batch)]
            yield {k: torch.cat([t[i] for t in trip]) for i, k in enumerate(("moving", "fixed", "truth"))}
        yield from self
