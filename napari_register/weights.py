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

from .errors import CheckpointError, MissingFileError

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
            raise MissingFileError(f"no shipped checkpoint named {text!r}; shipped: {shipped}; "
                                   "or pass the path of a .pt file")
        return path
    path = Path(text).expanduser()
    if not path.exists():
        raise MissingFileError(f"checkpoint file {path} does not exist; check the path")
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
    tmp_card = path.with_suffix(".json.tmp")
    tmp_card.write_text(json.dumps(card_json, indent=2, default=str) + "\n")
    tmp_card.replace(path.with_suffix(".json"))
    return path


def read_card(path: Path) -> dict[str, Any] | None:
    """The ``.json`` card beside checkpoint ``path`` (None when there is none); a card that is not a
    JSON object is refused, since it carries the checksum that vouches for the weights."""
    card_path = path.with_suffix(".json")
    if not card_path.exists():
        return None
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint card {card_path} is not valid JSON ({e}); restore it from where the "
                              "checkpoint came from (or retrain), or move it away to load the weights unchecked"
                              ) from None
    if not isinstance(card, dict) or not isinstance(card.get("sha256", ""), str):
        raise CheckpointError(f"checkpoint card {card_path} is not a card (a JSON object with a sha256 string); "
                              "restore it from where the checkpoint came from, or move it away")
    return card


def read_blob(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, loaded with ``weights_only=True``: tensors and plain values only, so a
    file carrying code is refused without running it (never retry such a file with weights_only=False)."""
    import pickle

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():  # torch's wording for "this pickle wants to call code"
            raise CheckpointError(f"checkpoint {path} is not a plain weights file: loading it would run Python code "
                                  "it names (objects beyond tensors and plain values); refused, nothing was run. Do "
                                  "not load this file; use a checkpoint saved by napari-register (train or the "
                                  "shipped ones)") from None
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint (or is damaged); "
                              "re-download or retrain it") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError) as e:
        # torch's zip reader on a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); the file is truncated or "
                              "not a checkpoint - re-download or retrain it") from None
    if not isinstance(blob, dict) or not {"method", "config", "state_dict"} <= set(blob):
        raise CheckpointError(f"checkpoint {path} is not a napari-register checkpoint (a dict with method, config "
                              "and state_dict); save weights with napari-register train")
    if not isinstance(blob["config"], dict) or not isinstance(blob.get("card", {}), dict) \
            or not isinstance(blob["state_dict"], dict):
        raise CheckpointError(f"checkpoint {path}: config, card and state_dict must be dicts; the file is damaged")
    return blob


def load(path: str | Path, method: str, dim: int, build: Callable[..., torch.nn.Module],
         device: torch.device | str = "cpu",
         upgrade: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
         ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint of ``method`` for ``dim``-D images; returns ``(model in eval mode, card)``.

    Refuses (:class:`CheckpointError`) a file whose checksum, method, dimensionality or weights do not
    match, or that carries anything but tensors and plain values. ``upgrade(config, card)`` returns
    the config to build with, for checkpoints saved before a config key existed.
    """
    path = Path(path)
    card = read_card(path)
    expected = card.get("sha256") if card else None
    if expected and expected != sha256(path):
        raise CheckpointError(f"checkpoint {path} does not match the sha256 in {path.with_suffix('.json').name}; "
                              "the file is corrupt or was replaced - re-download or retrain it")
    blob = read_blob(path)
    if blob.get("method") != method:
        raise CheckpointError(f"checkpoint {path} is for method {blob.get('method')!r}, not {method!r}; "
                              f"pick a {method} checkpoint")
    ckpt_dim = blob["config"].get("dim")
    if ckpt_dim != dim:
        raise CheckpointError(f"checkpoint {path} registers {ckpt_dim}D images but the images are {dim}D; "
                              f"pick a {dim}D checkpoint (e.g. {method}-{dim}d)")
    stored_card = blob.get("card", {})
    config = blob["config"] if upgrade is None else upgrade(dict(blob["config"]), stored_card)
    try:
        model = build(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its config {config} does not build a {method} network "
                              f"({e}); it was saved by another version - retrain it") from None
    expected_keys, got = set(model.state_dict()), set(blob["state_dict"])
    if expected_keys != got:
        lost, extra = sorted(expected_keys - got), sorted(got - expected_keys)
        raise CheckpointError(f"checkpoint {path} does not fit the {method} network: "
                              f"{len(lost)} missing weight(s) {lost[:3]}, {len(extra)} unexpected {extra[:3]}; "
                              "it is damaged or from another network - use a checkpoint saved for this method")
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as e:  # shapes differ
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "size mismatch")
        raise CheckpointError(f"checkpoint {path} does not fit the {method} network ({first}); "
                              "use a checkpoint saved for this method and configuration") from None
    return model.to(device).eval(), stored_card


def update_card(path: str | Path, dest: str | Path | None = None, **fields: Any) -> Path:
    """Copy the checkpoint ``path`` to ``dest`` (default: in place) with ``fields`` merged into its
    card (e.g. ``evaluation={...}`` after a benchmark); the sha256 is recomputed."""
    path = Path(path)
    blob = read_blob(path)
    card = {**blob.get("card", {}), **fields}
    # save() records the code version of the updating tree; the training's own is kept apart
    card.setdefault("trained_code_version", card.pop("code_version", None))
    state = blob["state_dict"]

    class _State(torch.nn.Module):  # save() takes a module; hand it the stored tensors unchanged
        def state_dict(self, *a: Any, **k: Any) -> dict[str, torch.Tensor]:
            return state

    return save(Path(dest) if dest else path, blob["method"], blob["config"], _State(), card)
