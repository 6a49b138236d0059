"""Live previews of a running registration, cheap enough to show while it runs: the moving image
warped by the method's working-grid map onto a coarse grid of the fixed image's extent, made only
while previews stay within a small share of the run's time (:func:`napari_register.api.iter_register`
with ``previews=True`` sets ``Progress.warped`` through :class:`Previewer`)."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from .coords import resize_map, sample
from .image import Image
from .transforms import Transform, warp_image

# A preview has at most this many voxels (the brain pair's 4.4 M become 1 M), and previews take at
# most PREVIEW_BUDGET of the run's time. A full-resolution preview of the brain pair costs 1.2 s (1
# thread) and its default run reports 9 maps: previews alone made the widget's run 1.5x the API's.
PREVIEW_VOXELS = 1_000_000
PREVIEW_BUDGET = 0.05


class Previewer:
    """Live previews of a running registration: the moving image warped by a working-grid map onto
    a coarse grid of the fixed image's extent, made only while previews stay within their budget."""

    def __init__(self, moving: Image, fixed: Image, init: Transform, voxels: int = PREVIEW_VOXELS,
                 budget: float = PREVIEW_BUDGET, clock: Callable[[], float] = time.perf_counter) -> None:
        scale = min(1.0, (voxels / math.prod(fixed.shape)) ** (1.0 / fixed.ndim))
        self.geometry = fixed.geometry.with_shape(tuple(max(round(s * scale), 2) for s in fixed.shape))
        self.moving, self.fixed, self.init = moving, fixed, init
        self.budget, self.clock = budget, clock
        self.start, self.spent = clock(), 0.0
        self._source: Optional[torch.Tensor] = None

    def due(self) -> bool:
        """Whether a preview now keeps previews within the budget (the first one always does)."""
        return self.spent <= self.budget * (self.clock() - self.start)

    def __call__(self, norm_map: torch.Tensor) -> Image:
        """The moving image through ``norm_map`` (``Progress.map``: moving_norm_from_fixed_norm of the
        centre-aligned moving image on the fixed extent, as the method sees it)."""
        t = self.clock()
        mov = self.moving
        if self._source is None:  # once per run: the centre-aligned moving image on the preview grid
            aligned = warp_image(mov, self.init, self.geometry).array
            chan = aligned if mov.channels else aligned[..., None]
            self._source = torch.from_numpy(np.ascontiguousarray(np.moveaxis(chan, -1, 0)[None], dtype=np.float32))
        phi = resize_map(norm_map.detach().float().cpu(), self.geometry.shape)
        arr = np.moveaxis(sample(self._source, phi, padding_mode="zeros")[0].numpy(), 0, -1)
        arr = arr if mov.channels else arr[..., 0]
        if mov.array.dtype.kind in "iub":  # RGB photos stay uint8 (napari shows them as colour)
            arr = np.rint(arr).astype(mov.array.dtype)
        self.spent += self.clock() - t
        return Image(arr, self.geometry, channels=mov.channels, rgb=mov.rgb)
