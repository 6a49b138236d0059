"""The bottom floor every long loop reports through: :class:`Progress` steps and :class:`Cancelled`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


class Cancelled(RuntimeError):
    """Raised inside :func:`napari_register.api.iter_register` when its ``cancel`` hook returns True."""


@dataclass
class Progress:
    """One step of a running registration; ``map`` (working resolution) is set for live previews."""

    stage: str
    step: int
    total: int
    loss: Optional[float] = None
    map: Any = None  # torch.Tensor (1, d, *working_shape) when set; typed loosely to keep torch out
    warped: Any = None  # set by the pipeline when previews are asked for: moving warped at fixed resolution

    def __str__(self) -> str:
        loss = "" if self.loss is None else f" loss {self.loss:.4f}"
        return f"{self.stage} {self.step}/{self.total}{loss}"
