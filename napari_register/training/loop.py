"""The training loop: seeds, resume, DDP under ``torchrun``, CUDA/CPU, JSON-lines logs, checkpoint
and card as it goes. It knows no method: the recipe (:mod:`.recipes`) says what to build, which
losses on which optimisers, in which order, and where batches come from.

Resumable: ``--run-dir`` keeps ``state.pt`` (model, every optimiser, step, RNG states); rerunning the
same command continues from the last save. Under ``torchrun`` every process draws its own batches
and rank 0 logs and saves.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import weights
from .recipe import Batch, Recipe, RunSettings
from .recipes import get_recipe


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    # plain tensors and tuples only, so the state file loads with weights_only=True like a checkpoint
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
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
    if name != "cpu":
        raise ValueError(f"unknown --device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def _json_arg(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object like '{{\"name\": value}}', got {text!r}")
    return value


def _command() -> str:
    argv = sys.argv
    if "train" in argv:
        return "napari-register train " + " ".join(shlex.quote(a) for a in argv[argv.index("train") + 1:])
    return " ".join(shlex.quote(a) for a in argv)


def _lineage(init: str) -> dict[str, Any]:
    """What a run started from, for the card (its own card's key facts, when it has one)."""
    path = Path(init)
    card = path.with_suffix(".json")
    prev = json.loads(card.read_text()) if card.exists() else {}
    return {"file": str(path), "sha256": weights.sha256(path),
            **{k: prev[k] for k in ("command", "steps", "seed", "code_version", "config", "init_from") if k in prev}}


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _mean_recent(history: list[dict[str, float]], n: int = 50) -> dict[str, float]:
    recent = history[-n:]
    keys = {k for h in recent for k in h if k != "step"}
    return {k: float(np.mean([h[k] for h in recent if k in h])) for k in sorted(keys)}


def train(args: argparse.Namespace, module: Any = None) -> Path:
    """Train per ``args`` (see :func:`napari_register.training.add_train_arguments`); returns the
    checkpoint path. ``module``: the recipe module (``DIMS``, ``OPTIONS``, ``recipe``); default the
    one registered for ``args.method``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    module = get_recipe(args.method) if module is None else module
    options = _json_arg(args.recipe_options, "--recipe-options")
    settings = RunSettings(dim=args.dim, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                           shape=tuple(args.shape) if args.shape else None,
                           config=_json_arg(args.config, "--config"))
    if args.dim not in module.DIMS:
        raise ValueError(f"method {args.method!r} trains on {' or '.join(f'{d}D' for d in module.DIMS)} "
                         f"images, not {args.dim}D")
    device = _device(args.device, local_rank)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe: Recipe = module.recipe(settings, options)
    out = Path(args.out).with_suffix(".pt")
    run_dir = Path(args.run_dir) if args.run_dir else out.with_suffix(".run")
    state_path = run_dir / "state.pt"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    _seed_all(args.seed)
    model = recipe.build(**recipe.config).to(device)
    optimisers = {name: spec.make(list(spec.params(model)), spec.rate(0)) for name, spec in recipe.optimisers.items()}
    step, history = 0, []
    data_seed = args.seed * 1000 + rank  # each process its own batches
    init_lineage = _lineage(args.init) if args.init else None
    if args.init and not state_path.exists():
        blob = weights.read_blob(Path(args.init))  # refuses a file carrying code, without running it
        # The config may differ in settings without weights (e.g. CARL's attention_scale); the
        # strict load checks that every weight has its place and shape.
        try:
            model.load_state_dict(blob["state_dict"])
        except RuntimeError as e:
            raise ValueError(f"--init {args.init} (config {blob['config']}) does not fit the network of "
                             f"config {recipe.config}: {e}") from None
    if state_path.exists():  # resume exactly where the last save left off
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["config"] != recipe.config or set(state["optimisers"]) != set(optimisers):
            raise ValueError(f"{state_path} was trained with config {state['config']}, not {recipe.config}; "
                             "use another --run-dir or the same options")
        model.load_state_dict(state["model"])
        for name, opt in optimisers.items():
            opt.load_state_dict(state["optimisers"][name])
        step, history = state["step"], state["history"]
        _set_rng_state(state["rng"])
        data_seed += 7919 * step  # fresh batches after a resume, still reproducible
        if rank == 0:
            print(f"resumed {state_path} at step {step}", flush=True)
    train_model = model
    if world > 1:
        # find_unused_parameters: a phase may train only part of the network
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=True)
    batches = recipe.batches(data_seed)
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    command = _command()

    def save() -> None:
        if rank != 0:
            return
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimisers": {k: o.state_dict() for k, o in optimisers.items()},
                    "step": step, "history": history, "rng": _rng_state(), "config": recipe.config}, tmp)
        tmp.replace(state_path)
        weights.save(out, args.method, recipe.config, model, {
            "dim": args.dim, "command": command, "data": recipe.data, "steps": step, "seed": args.seed,
            "batch": args.batch * world, "lr": args.lr, "recipe_options": recipe.card.get("options", options),
            "phases": [{"name": p.name, "optimiser": p.optimiser, "steps": p.steps} for p in recipe.phases],
            "alternate": recipe.alternate, "device": str(device), "world_size": world, "init": args.init,
            "init_from": init_lineage, "final_losses": _mean_recent(history), "evaluation": {},
            **{k: v for k, v in recipe.card.items() if k != "options"}})

    def update(phase, batch: Batch) -> dict[str, float]:
        spec, opt = recipe.optimisers[phase.optimiser], optimisers[phase.optimiser]
        for group in opt.param_groups:  # set each step: a resumed optimiser keeps its old rate
            group["lr"] = spec.rate(step)
        loss, logs = phase.loss(train_model, batch, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss ({phase.name}) became {loss.item()} at step {step}; "
                                     "lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not all(bool(torch.isfinite(p.grad).all()) for p in params):
            # a finite loss with a non-finite gradient (e.g. a degenerate fit inside the loss): skip
            # this update, as AMP's GradScaler does, rather than poison the weights
            return {"loss": float(loss.detach()), **logs, "skipped": 1.0}
        if spec.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, spec.clip)
        opt.step()
        return {"loss": float(loss.detach()), **logs}

    t0 = time.perf_counter()
    model.train()
    while step < args.steps:
        batch = _to(next(batches), device)
        if recipe.alternate:
            entry: dict[str, Any] = {}
            for phase in recipe.phases:
                entry.update({f"{phase.name}/{k}": v for k, v in update(phase, batch).items()})
        else:
            phase = recipe.phase_at(step)
            entry = update(phase, batch)
        step += 1
        entry = {"step": step, **entry}
        history.append(entry)
        if log is not None:
            log.write(json.dumps({**entry, "sec": round(time.perf_counter() - t0, 2)}) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == args.steps:
            save()
        keep = getattr(args, "keep_every", 0)
        if rank == 0 and keep and step % keep == 0:
            if step % args.save_every:
                save()
            for src in (out, out.with_suffix(".json")):
                shutil.copyfile(src, run_dir / f"step{step}{src.suffix}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if log is not None:
        log.close()
        print(f"saved {out} after {step} steps", flush=True)
    return out
