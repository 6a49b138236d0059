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
    # A note for the user (stage "note"): something the run changed on their behalf (a lower working
    # resolution, the CPU instead of CUDA) or noticed about the inputs. Front ends show it as is.
    message: Optional[str] = None

    def __str__(self) -> str:
        if self.message is not None:
            return self.message
        loss = "" if self.loss is None else f" loss {self.loss:.4f}"
        return f"{self.stage} {self.step}/{self.total}{loss}"
