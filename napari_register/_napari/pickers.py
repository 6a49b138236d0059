"""What the widgets' pickers offer: the viewer's layers of a kind, the shipped checkpoints of a method."""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

from .. import weights
from .layers import META_KEY


def shipped_checkpoints(method: str, dim: int) -> list[tuple[str, str]]:
    """(name, path) of the checkpoints shipped for ``method`` in ``dim``-D, from their json cards."""
    out = []
    for card_path in sorted(weights.CHECKPOINT_DIR.glob("*.json")):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError):
            continue  # a broken card is not a checkpoint to offer
        pt = card_path.with_suffix(".pt")
        if card.get("method") == method and int(card.get("dim", 0)) == dim and pt.exists():
            out.append((card_path.stem, str(pt)))
    return out


def layer_choices(viewer: Any, kind: type, exclude_role: Optional[str] = None,
                  ndim: Optional[Callable[[], Optional[int]]] = None):
    """magicgui ``choices`` callable: the viewer's layers of one type, as (name, layer); with ``ndim``,
    only those of the pair's dimension (a 2D points layer is no choice for a 3D pair)."""
    def choices(_widget: Any = None) -> list[tuple[str, Any]]:
        want = ndim() if ndim is not None else None
        return [(layer.name, layer) for layer in viewer.layers if type(layer) is kind
                and (exclude_role is None or layer.metadata.get(META_KEY, {}).get("role") != exclude_role)
                and (want is None or layer.ndim == want)]
    return choices
