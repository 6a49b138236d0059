"""Shared training loop: ``napari-register train --method carl --dim 3 ...``.

Resumable (``--run-dir`` keeps ``state.pt`` with model, optimiser, step and RNG states), saves the
checkpoint with its card as it goes, logs losses as JSON lines, seeds everything, runs on CPU or
CUDA, and under ``torchrun`` with DistributedDataParallel (rank 0 logs and saves). A method takes
part by giving its class a ``trainer(dim, args) -> TrainSpec`` classmethod.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class TrainSpec:
    """What the loop needs from a method.

    ``loss(model, moving, fixed, step) -> (loss, logs)``; ``pairs(seed) -> iterator`` of
    ``(moving, fixed)`` CPU batches; ``data`` describes the data for the card.
    """

    config: dict[str, Any]
    build: Callable[..., torch.nn.Module]
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]
    pairs: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    data: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)  # extra card fields (loss settings, ...)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="method whose network to train (e.g. carl)")
    p.add_argument("--dim", type=int, choices=(2, 3), required=True)
    p.add_argument("--out", required=True, help="checkpoint to write (.pt; a .json card goes next to it)")
    p.add_argument("--run-dir", help="folder for state.pt (resume) and log.jsonl; default: <out>.run")
    p.add_argument("--steps", type=int, default=2000, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=1, help="pairs per step (per process under torchrun)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-main", type=float, help="learning rate after the warm-up (default: --lr)")
    p.add_argument("--shape", type=int, nargs="+", help="training grid (array order); method default if unset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints/state saves")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--real-fraction", type=float, default=0.5, help="share of pairs from real volumes")
    p.add_argument("--real-shift", type=float, default=0.15,
                   help="largest random translation of each real volume (norm units; smaller once an affine "
                        "stage pre-aligns the pairs at inference)")
    p.add_argument("--warmup", type=int, default=300, help="steps with the warm-up loss (e.g. diffusion)")
    p.add_argument("--ramp", type=int, default=200,
                   help="steps over which the main regulariser weight ramps up after the warm-up")
    p.add_argument("--reg", help="regulariser after the warm-up, for methods that offer a choice (carl: "
                   "gradicon, diffusion)")
    p.add_argument("--init", help="start from the weights of this checkpoint (a fresh optimiser)")
    p.add_argument("--lam", type=float, help="regulariser weight (method default if unset)")
    p.add_argument("--lam-warmup", type=float, help="warm-up regulariser weight (method default if unset)")
    p.add_argument("--lncc-eps", type=float, help="variance floor of the LNCC similarity, for methods trained "
                   "with it (carl; default 1e-3)")
    p.add_argument("--config", default="{}", help="network config overrides as JSON, e.g. '{\"xi\": \"unet\"}'")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for but no CUDA GPU is available; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def main(args: argparse.Namespace) -> Path:
    """Train per ``args`` (see :func:`add_train_arguments`); returns the checkpoint path."""
    from . import weights
    from .methods.registry import get_method

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(args.device, local_rank)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    cls = get_method(args.method)
    if not hasattr(cls, "trainer"):
        raise ValueError(f"method {args.method!r} has no network to train")
    if args.dim not in cls.dims:
        raise ValueError(f"method {args.method!r} handles {cls.dims}D images, not {args.dim}D")
    spec: TrainSpec = cls.trainer(args.dim, args)
    out = Path(args.out).with_suffix(".pt")
    run_dir = Path(args.run_dir) if args.run_dir else out.with_suffix(".run")
    state_path = run_dir / "state.pt"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    _seed_all(args.seed)
    model = spec.build(**spec.config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, history = 0, []
    data_seed = args.seed * 1000 + rank  # each process its own pairs
    init_lineage = None
    if args.init:  # what the run started from, for the card (its own card, when it has one)
        init_path = Path(args.init)
        init_card = init_path.with_suffix(".json")
        prev = json.loads(init_card.read_text()) if init_card.exists() else {}
        init_lineage = {"file": str(init_path), "sha256": weights.sha256(init_path),
                        **{k: prev[k] for k in ("command", "steps", "seed", "code_version", "config") if k in prev}}
    if args.init and not state_path.exists():
        from_blob = torch.load(args.init, map_location="cpu", weights_only=True)
        # The config may differ in settings without weights (e.g. CARL's attention_scale); the
        # strict load checks that every weight has its place and shape.
        try:
            model.load_state_dict(from_blob["state_dict"])
        except RuntimeError as e:
            raise ValueError(f"--init {args.init} (config {from_blob['config']}) does not fit the network of "
                             f"config {spec.config}: {e}") from None
    if state_path.exists():  # resume exactly where the last save left off
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["config"] != spec.config:
            raise ValueError(f"{state_path} was trained with config {state['config']}, not {spec.config}; "
                             "use another --run-dir or the same options")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
        _set_rng_state(state["rng"])
        data_seed += 7919 * step  # fresh pairs after a resume, still reproducible
        if rank == 0:
            print(f"resumed {state_path} at step {step}", flush=True)
    train_model = model
    if world > 1:
        # find_unused_parameters: a warm-up phase may train only part of the network
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=True)
    pairs = spec.pairs(data_seed)
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    command = "napari-register train " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("train") + 1:]) \
        if "train" in sys.argv else " ".join(shlex.quote(a) for a in sys.argv)

    def save() -> None:
        if rank != 0:
            return
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
                    "rng": _rng_state(), "config": spec.config}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
        recent = history[-50:]
        final = {k: float(np.mean([h[k] for h in recent])) for k in recent[0] if k != "step"} if recent else {}
        weights.save(out, args.method, spec.config, model, {
            "dim": args.dim, "command": command, "data": spec.data, "steps": step, "seed": args.seed,
            "batch": args.batch * world, "lr": args.lr, "lr_main": args.lr_main or args.lr, "warmup": args.warmup,
            "device": str(device), "world_size": world, "init": args.init, "init_from": init_lineage,
            "final_losses": final, "evaluation": {}, **spec.card})

    t0 = time.perf_counter()
    model.train()
    while step < args.steps:
        lr = args.lr if step < args.warmup or args.lr_main is None else args.lr_main
        for group in opt.param_groups:  # set each step: a resumed optimiser state keeps its old lr
            group["lr"] = lr
        moving, fixed = next(pairs)
        loss, logs = spec.loss(train_model, moving.to(device), fixed.to(device), step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        step += 1
        entry = {"step": step, "loss": float(loss.detach()), **logs}
        history.append(entry)
        if log is not None:
            log.write(json.dumps({**entry, "sec": round(time.perf_counter() - t0, 2)}) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == args.steps:
            save()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if log is not None:
        log.close()
        print(f"saved {out} after {step} steps", flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m napari_register.train", description=__doc__.splitlines()[0])
    add_train_arguments(p)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
