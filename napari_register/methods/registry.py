"""Method registry: a method is found by name, an unknown name is an error listing the known ones.

A method is a class deriving from :class:`Method`. The pipeline (:mod:`napari_register.api`) hands it
two intensity-normalised tensors that already share the fixed image's physical grid, resized to
``working_shape``; the method yields :class:`Progress` and returns a :class:`MethodOutput` whose
``map`` sends fixed ``norm`` coordinates to moving ``norm`` coordinates (see :mod:`coords`).
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Generator, Optional

import torch

from ..errors import InputError
from ..progress import Progress, Stage

_REGISTRY: dict[str, type["Method"]] = {}


@dataclass
class MethodOutput:
    """``map``: ``(1, d, *working_shape)`` moving_norm_from_fixed_norm. ``matrix``: the same
    transform as a homogeneous ``(d+1, d+1)`` matrix in the norm frame, for affine/homography methods."""

    map: torch.Tensor
    matrix: Optional[torch.Tensor] = None
    loss: Optional[float] = None
    # a homography fitted to a dense ``map`` (norm frame), exported beside the field; not the transform
    homography: Optional[torch.Tensor] = None
    state: Any = None  # method-private (e.g. a fine-tuned network) to continue from, see ``iter_run(init=)``


class Method:
    """Base class of registration methods (subclass and decorate with :func:`register_method`)."""

    name: ClassVar[str] = ""
    dims: ClassVar[tuple[int, ...]] = (2, 3)
    kind: ClassVar[str] = "deformable"  # or "homography"
    needs_checkpoint: ClassVar[bool] = False
    default_io_steps: ClassVar[int] = 0
    # on the CPU, where instance optimisation can take minutes: None keeps ``default_io_steps``
    default_io_steps_cpu: ClassVar[Optional[int]] = None
    description: ClassVar[str] = ""
    # Named option sets for kinds of data, per dimensionality (the Register widget's "settings");
    # none: the defaults only.
    presets: ClassVar[dict[int, dict[str, dict[str, Any]]]] = {}

    def __init__(self, dim: int, device: torch.device, checkpoint: str | Path | None = None,
                 **options: Any) -> None:
        if dim not in self.dims:
            raise InputError(f"method {self.name!r} registers {' or '.join(f'{d}D' for d in self.dims)} "
                             f"images, not {dim}D; pick one of {list_methods(dim)}")
        self.dim = dim
        self.device = device
        self.checkpoint = checkpoint
        self.checkpoint_name: Optional[str] = None if checkpoint is None else str(checkpoint)  # what was loaded
        if options:
            raise InputError(f"method {self.name!r} takes no options {sorted(options)}")

    @classmethod
    def io_steps_default(cls, device: torch.device) -> int:
        """Instance-optimisation steps when none are asked for, on ``device``."""
        if device.type == "cpu" and cls.default_io_steps_cpu is not None:
            return cls.default_io_steps_cpu
        return cls.default_io_steps

    def working_shape(self, shape: tuple[int, ...], spacing_xyz: tuple[float, ...]) -> tuple[int, ...]:
        """Grid the method works on for a fixed image of ``shape`` (array order) and spacing."""
        return tuple(shape)

    def memory_bytes(self, shape: tuple[int, ...], io_steps: int) -> int:
        """Estimated peak bytes the method allocates on its device for a ``shape`` working grid
        (measured on CPU; the pipeline adds what it holds on the fixed grid). Override per method."""
        return 300 * math.prod(shape)

    def plan(self, shape: tuple[int, ...], io_steps: int, continuing: bool = False) -> list[Stage]:
        """The stages :meth:`iter_run` will report on a ``shape`` working grid, in order, with their
        step counts and seconds on the reference CPU (``continuing``: ``init`` is given). The
        progress bar and the time estimate follow it. Override per method."""
        return [Stage(self.name, 1, 1e-6 * math.prod(shape))]

    def iter_run(self, moving: torch.Tensor, fixed: torch.Tensor, io_steps: int,
                 init: MethodOutput | None = None) -> Generator[Progress, None, MethodOutput]:
        """Register ``moving`` to ``fixed`` (both ``(1, 1, *working_shape)`` in [0, 1]).

        ``io_steps``: instance-optimisation steps after the method's own result. ``init``: a previous
        output on the same pair (same working shape) to continue from, e.g. for more instance
        optimisation; methods that cannot continue start afresh."""
        raise NotImplementedError


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


# The method modules, in one place: importing one registers its methods.
BUILTIN = ("optimize", "carl", "ran", "art", "alto")


def _load_builtin() -> None:
    # Lazy, so importing the package (as napari does to read its manifest) stays cheap.
    import importlib

    for mod in BUILTIN:
        importlib.import_module(f"{__package__}.{mod}")


def get_method(name: str) -> type[Method]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def option_names(cls: type[Method]) -> list[str]:
    """The options ``cls(dim, device, checkpoint, **options)`` takes (its constructor's keywords)."""
    params = inspect.signature(cls.__init__).parameters.values()
    fixed = {"self", "dim", "device", "checkpoint"}
    return sorted(p.name for p in params if p.name not in fixed
                  and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def parse_options(text: Optional[str], flag: str = "--options") -> Optional[dict[str, Any]]:
    """Method options from a JSON object given on the command line (None when not given)."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except ValueError as e:
        raise InputError(f"{flag} is not valid JSON ({getattr(e, 'msg', e)} at character {getattr(e, 'pos', '?')}): "
                         f"{text!r}; write an object like '{{\"levels\": [4, 2]}}' in single quotes") from None
    if not isinstance(options, dict):
        raise InputError(f"{flag} must be a JSON object like '{{\"name\": value}}', got {text!r}")
    return options


def check_options(cls: type[Method], options: Any) -> dict[str, Any]:
    """``options`` as a dict, or :class:`InputError` naming an unknown option and listing the known."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InputError(f"options for {cls.name!r} must be a JSON object like {{\"name\": value}}, "
                         f"got {type(options).__name__}")
    known = option_names(cls)
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise InputError(f"method {cls.name!r} has no option(s) {unknown}; its options: {', '.join(known) or 'none'}")
    return dict(options)


def list_methods(dim: int | None = None) -> list[str]:
    """Names of the registered methods, only those that handle ``dim``-D images when given."""
    _load_builtin()
    return sorted(n for n, c in _REGISTRY.items() if dim is None or dim in c.dims)
