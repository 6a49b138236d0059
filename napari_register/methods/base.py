"""The network-method base: what every trained method shares, so a new one is its network, a small
adapter (``build``, ``predict``, ``io_objective``) and a registry line.

It owns the checkpoint (shipped name or path, checksum, strict load, the card whose training
settings become the defaults), the affine pre-stage (the one ``optimize`` uses) and instance
optimisation, which fine-tunes a *copy* of the network on the pair (the loaded model never changes).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Generator, Optional

import torch
import torch.nn as nn

from .. import coords, weights
from ..initial import InitialSettings, initial_stage, iter_initial
from ..instance_opt import finetune_copy, iter_optimise
from ..progress import Progress, Stage
from .registry import Method, MethodOutput

def isotropic_working_shape(shape: tuple[int, ...], spacing_xyz: tuple[float, ...], voxels: int,
                            multiple: int) -> tuple[int, ...]:
    """An isotropic grid over the image's physical extent with about ``voxels`` voxels, sizes
    divisible by ``multiple`` (at least ``2 * multiple``), never finer than the image (rounded)."""
    spacing = [float(s) for s in spacing_xyz][::-1]  # array order
    extent = [n * s for n, s in zip(shape, spacing)]
    step = (math.prod(extent) / voxels) ** (1 / len(shape))
    return tuple(max(multiple * round(min(e / step, n) / multiple), 2 * multiple) for n, e in zip(shape, extent))


IOObjective = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""``() -> (loss, map)``: one evaluation of the instance-optimisation loss and the current map
(network frame: before the affine stage), which previews show."""


# LNCC's variance floor in the initial alignment: the default (1e-3) counts faint texture as flat, and
# an affine then gains by magnifying the image (a loss below the identity's on two identical images)
AFFINE_EPS = 1e-5


class NetworkMethod(Method):
    """Base of methods driven by a trained network (subclass, set the class settings, decorate with
    :func:`register_method`). ``state`` of its outputs is ``{"net", "affine"}``: a later run on the
    same pair continues from the fine-tuned copy."""

    needs_checkpoint = True
    io_lr: ClassVar[float] = 1e-4
    io_lr_decay: ClassVar[float] = 1.0  # io_lr_end defaults to this fraction of io_lr
    io_preview_every: ClassVar[int] = 10
    affine_window: ClassVar[int] = 9  # LNCC window of the affine stage

    def __init__(self, dim: int, device: torch.device, checkpoint: str | Path | None = None, *,
                 affine_iterations: int = 200, io_lr: Optional[float] = None, io_lr_end: Optional[float] = None,
                 io_warmup: int = 0) -> None:
        super().__init__(dim, device, checkpoint)
        self.io_lr = type(self).io_lr if io_lr is None else float(io_lr)
        self.io_lr_end = self.io_lr * self.io_lr_decay if io_lr_end is None else float(io_lr_end)
        if not 0 < self.io_lr_end <= self.io_lr:
            raise ValueError(f"io_lr_end must be in (0, io_lr = {self.io_lr:g}], got {self.io_lr_end:g}; "
                             "set it equal to io_lr for a constant rate")
        self.io_warmup = int(io_warmup)
        if self.io_warmup < 0:
            raise ValueError(f"io_warmup must be >= 0 steps (0: no warm-up), got {io_warmup}")
        # The affine pre-alignment takes out global rotation and scale between subjects; 0 skips it.
        self.affine_iterations = int(affine_iterations)  # the most steps of one fit (napari_register.initial)
        self.initial = InitialSettings(iterations=self.affine_iterations)
        path = weights.resolve(checkpoint, f"{self.name}-{dim}d")
        self.net, self.card = self.load(path, device)
        self.checkpoint_name = path.stem if path.parent == weights.CHECKPOINT_DIR else str(path)

    # seconds per working voxel on the reference CPU (2 threads): the network's map, one IO step
    network_seconds: ClassVar[dict[int, float]] = {2: 1e-6, 3: 1e-6}
    io_seconds: ClassVar[dict[int, float]] = {2: 1e-5, 3: 1e-5}

    def plan(self, shape: tuple[int, ...], io_steps: int, continuing: bool = False) -> list[Stage]:
        voxels = math.prod(shape)
        stages = []
        if self.affine_iterations and not continuing:
            stages.append(initial_stage(shape, self.initial, f"{self.name} affine"))
        stages.append(Stage("network", 1, self.network_seconds[self.dim] * voxels))
        if io_steps > 0:
            stages.append(Stage("instance optimisation", io_steps, self.io_seconds[self.dim] * voxels * io_steps))
        return stages

    # ------------------------------------------------------------------ what a subclass provides
    @staticmethod
    def build(**config: Any) -> nn.Module:
        """The network from the config its checkpoint stores."""
        raise NotImplementedError

    def load(self, path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
        """``(network in eval mode, card)`` from a checkpoint file (override to upgrade old configs)."""
        return weights.load(path, self.name, self.dim, self.build, device)

    @property
    def train_card(self) -> dict[str, Any]:
        """The training settings on the card (``{}`` for cards without them): IO's defaults."""
        return self.card.get("train", {})

    def predict(self, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The network's map for an (affinely pre-aligned) pair; no gradient is taken here."""
        return net(moving, fixed)

    def io_objective(self, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> IOObjective:
        """The instance-optimisation loss of ``net`` (a trainable copy) on the pre-aligned pair."""
        raise NotImplementedError(f"method {self.name!r} has no instance optimisation")

    # ------------------------------------------------------------------ the shared run
    def iter_prealign(self, moving: torch.Tensor, fixed: torch.Tensor) -> Generator[Progress, None, torch.Tensor]:
        """The initial alignment (:mod:`napari_register.initial`) every network starts from."""
        from ..losses import get_similarity

        sim = get_similarity("lncc", window=self.affine_window, eps=AFFINE_EPS)
        return (yield from iter_initial(moving, fixed, sim, self.initial, f"{self.name} affine"))

    def iter_run(self, moving: torch.Tensor, fixed: torch.Tensor, io_steps: int,
                 init: MethodOutput | None = None) -> Generator[Progress, None, MethodOutput]:
        shape = tuple(fixed.shape[2:])
        if init is not None and isinstance(init.state, dict):  # continue a previous run on this pair
            net, affine = init.state["net"], init.state["affine"]
        else:
            net, affine = self.net, None
            if self.affine_iterations:
                affine = yield from self.iter_prealign(moving, fixed)
        # The network registers the affinely pre-aligned moving image; the map is affine o network.
        if affine is not None:
            moving = coords.sample(moving, coords.matrix_map(affine, shape))
        full = (lambda phi: coords.apply_matrix(affine, phi)) if affine is not None else (lambda phi: phi)
        with torch.no_grad():
            phi = self.predict(net, moving, fixed)
        yield Progress("network", 1, 1, map=full(phi))
        if io_steps <= 0:
            return MethodOutput(map=full(phi), state={"net": net, "affine": affine})
        net = finetune_copy(net)  # the loaded model is never changed in place
        objective = self.io_objective(net, moving, fixed)

        def loss_fn() -> tuple[torch.Tensor, torch.Tensor]:
            loss, preview = objective()
            return loss, full(preview)

        final = yield from iter_optimise(net.parameters(), loss_fn, io_steps, self.io_lr,
                                         preview_every=self.io_preview_every, lr_end=self.io_lr_end,
                                         warmup=self.io_warmup)
        net.eval()
        with torch.no_grad():
            phi = self.predict(net, moving, fixed)
        return MethodOutput(map=full(phi), loss=final, state={"net": net, "affine": affine})
