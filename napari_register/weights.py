"""Checkpoints: ``{"method", "config", "state_dict", "card"}`` in a ``.pt`` next to a ``.json`` card.

The card (method, dim, config, training command, data, steps, seed, losses, evaluation numbers,
code version) is stored in both files; the json also carries the sha256 of the ``.pt`` so a
truncated or swapped file is refused before ``torch.load``. Loading is strict: the network is
rebuilt from its stored config and every weight must match.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


def resolve(checkpoint: str | Path | None, default: str) -> Path:
    """``None`` -> the shipped ``default``; a bare name -> ``checkpoints/<name>.pt``; else a path."""
    if checkpoint is None:
        checkpoint = default
    text = str(checkpoint)
    if "/" not in text and "\\" not in text and not text.endswith(".pt"):
        path = CHECKPOINT_DIR / f"{text}.pt"
        if not path.exists():
            shipped = sorted(p.stem for p in CHECKPOINT_DIR.glob("*.pt"))
            raise FileNotFoundError(f"no shipped checkpoint named {text!r}; shipped: {shipped}; "
                                    "or pass the path of a .pt file")
        return path
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    return path


def git_version() -> str:
    """Commit of the working tree (``+dirty`` with local changes), or ``"unknown"`` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "no-commit") + ("+dirty" if dirty else "")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(path: str | Path, method: str, config: dict[str, Any], model: torch.nn.Module,
         card: dict[str, Any]) -> Path:
    """Write ``path`` (.pt) and its ``.json`` card; returns the .pt path. Weights are stored as
    float32 on CPU so the file loads anywhere."""
    path = Path(path).with_suffix(".pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    card = {"method": method, "config": config, "code_version": git_version(), **card}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"method": method, "config": config, "state_dict": state, "card": card}, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half checkpoint under the real name
    card_json = {**card, "sha256": sha256(path), "file": path.name}
    path.with_suffix(".json").write_text(json.dumps(card_json, indent=2, default=str) + "\n")
    return path


def load(path: str | Path, method: str, dim: int, build: Callable[..., torch.nn.Module],
         device: torch.device | str = "cpu",
         upgrade: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
         ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint of ``method`` for ``dim``-D images; returns ``(model in eval mode, card)``.

    Refuses a file whose checksum, method or dimensionality does not match. ``upgrade(config, card)``
    returns the config to build with, for checkpoints saved before a config key existed.
    """
    path = Path(path)
    card_path = path.with_suffix(".json")
    if card_path.exists():
        expected = json.loads(card_path.read_text()).get("sha256")
        if expected and expected != sha256(path):
            raise ValueError(f"checkpoint {path} does not match the sha256 in {card_path.name}; "
                             "the file is corrupt or was replaced - re-download or retrain it")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("method") != method:
        raise ValueError(f"checkpoint {path.name} is for method {blob.get('method')!r}, not {method!r}; "
                         f"pick a {method} checkpoint")
    ckpt_dim = blob["config"].get("dim")
    if ckpt_dim != dim:
        raise ValueError(f"checkpoint {path.name} registers {ckpt_dim}D images but the images are {dim}D; "
                         f"pick a {dim}D checkpoint (e.g. {method}-{dim}d)")
    config = blob["config"] if upgrade is None else upgrade(dict(blob["config"]), blob["card"])
    model = build(**config)
    model.load_state_dict(blob["state_dict"], strict=True)
    return model.to(device).eval(), blob["card"]


def update_card(path: str | Path, dest: str | Path | None = None, **fields: Any) -> Path:
    """Copy the checkpoint ``path`` to ``dest`` (default: in place) with ``fields`` merged into its
    card (e.g. ``evaluation={...}`` after a benchmark); the sha256 is recomputed."""
    path = Path(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    card = {**blob["card"], **fields}
    # save() records the code version of the updating tree; the training's own is kept apart
    card.setdefault("trained_code_version", card.pop("code_version", None))
    state = blob["state_dict"]

    class _State(torch.nn.Module):  # save() takes a module; hand it the stored tensors unchanged
        def state_dict(self, *a: Any, **k: Any) -> dict[str, torch.Tensor]:
            return state

    return save(Path(dest) if dest else path, blob["method"], blob["config"], _State(), card)
