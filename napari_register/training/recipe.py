"""What a method gives the training loop: a :class:`Recipe` of :class:`Phase`\\ s on named
:class:`Optimiser`\\ s and a batch source. Batches are dicts of CPU tensors (``"moving"``,
``"fixed"`` and whatever ground truth a recipe's source adds, e.g. ``"truth_matrix"``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.nn as nn

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch, int], tuple[torch.Tensor, dict[str, float]]]
"""``loss(model, batch, step) -> (loss, logs)``; ``model`` may be DDP-wrapped (call it, or reach the
network's parts through :func:`unwrap`)."""


def all_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return model.parameters()


def adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


@dataclass
class Optimiser:
    """An optimiser over some of the model's parameters. ``lr``: a rate, or ``step -> rate``
    (set before every step, so a resumed run follows the schedule). ``clip``: gradient-norm bound."""

    lr: Union[float, Callable[[int], float]]
    params: Callable[[nn.Module], Iterable[nn.Parameter]] = all_parameters
    make: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer] = adam
    clip: Optional[float] = 10.0

    def rate(self, step: int) -> float:
        return float(self.lr(step) if callable(self.lr) else self.lr)


@dataclass
class Phase:
    """A loss minimised by one optimiser. ``steps``: how long it runs when phases follow each
    other (``None``: to the end); ignored when they alternate."""

    name: str
    loss: LossFn
    optimiser: str = "net"
    steps: Optional[int] = None


@dataclass
class Recipe:
    """How to train one method. ``alternate``: every step runs each phase in turn on the same batch
    (AltO); otherwise the phases follow each other (CARL: warm-up, then the main loss).
    ``batches(seed)``: an endless iterator of CPU batches. ``data``/``card``: for the card."""

    config: dict[str, Any]
    build: Callable[..., nn.Module]
    phases: list[Phase]
    batches: Callable[[int], Iterator[Batch]]
    optimisers: dict[str, Optimiser]
    alternate: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = {p.optimiser for p in self.phases} - set(self.optimisers)
        if unknown:
            raise ValueError(f"phases name optimisers {sorted(unknown)} the recipe does not define "
                             f"({sorted(self.optimisers)})")
        if not self.phases:
            raise ValueError("a recipe needs at least one phase")

    def phase_at(self, step: int) -> Phase:
        """The phase of a sequential recipe at ``step`` (0-based)."""
        start = 0
        for phase in self.phases:
            if phase.steps is None or step < start + phase.steps:
                return phase
            start += phase.steps
        return self.phases[-1]


@dataclass
class RunSettings:
    """The generic settings every recipe sees (from the command line)."""

    dim: int
    steps: int
    batch: int
    lr: float
    seed: int
    shape: Optional[tuple[int, ...]] = None
    config: dict[str, Any] = field(default_factory=dict)  # network config overrides


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def resolve_options(defaults: dict[str, Any], given: dict[str, Any], method: str) -> dict[str, Any]:
    """``defaults`` updated by ``given``; an unknown name is an error listing the known ones."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"--recipe-options: {method} has no option(s) {unknown}; its options and defaults: "
                         f"{defaults}")
    return {**defaults, **given}
