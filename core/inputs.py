"""A batch of a model's inputs by name, bound to its forward signature: what every pass over data,
every trace and every export feeds the model."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import DataError

# The name of a single input stored without one (an .npz's `x`); it binds to the model's only required input.
UNNAMED = "x"
_HINT = "Name each array in the data after the forward parameter it feeds (a single input may be called x)."


@dataclass(frozen=True)
class Signature:
    """One input as the model sees it: its name, dtype and per-sample shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def is_sequence(self) -> bool:
        """Token ids or a mask (integer, one row per sample): axis 1 is a sequence of any length."""
        return len(self.shape) == 1 and not self.dtype.is_floating_point


@dataclass(frozen=True, eq=False)
class Inputs:
    """Tensors by input name, samples on dim 0, in the model's forward-parameter order.

    The model is called with keywords, so optional parameters the data leaves out keep their
    defaults; `positional` is set for a forward that only takes *args.
    """

    tensors: Mapping[str, torch.Tensor]
    positional: bool = False

    def __post_init__(self) -> None:
        if not self.tensors:
            raise DataError("The data holds no input arrays.", hint=_HINT, code="missing_input")
        lengths = {name: int(t.shape[0]) if t.dim() else 0 for name, t in self.tensors.items()}
        if len(set(lengths.values())) > 1:
            found = ", ".join(f"{name}: {n}" for name, n in lengths.items())
            raise DataError(f"The inputs hold different numbers of samples ({found}).",
                            hint="Give every input array the same first dimension, one row per sample.",
                            code="inputs_length_mismatch")
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @classmethod
    def single(cls, x: torch.Tensor) -> Inputs:
        return cls({UNNAMED: x})

    def __len__(self) -> int:
        return int(self.first.shape[0])

    def __getitem__(self, index: slice | torch.Tensor) -> Inputs:
        return self._map(lambda t: t[index])

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def first(self) -> torch.Tensor:
        """The first input: the one a single-input report line describes."""
        return next(iter(self.tensors.values()))

    @property
    def signature(self) -> list[Signature]:
        return [Signature(name, t.dtype, tuple(t.shape[1:])) for name, t in self.tensors.items()]

    def to(self, device: torch.device | str) -> Inputs:
        return self._map(lambda t: t.to(device))

    def call(self, model: nn.Module) -> Any:
        """`model`'s output on these inputs."""
        if self.positional:
            return model(*self.tensors.values())
        return model(**self.tensors)

    @property
    def example_inputs(self) -> dict[str, torch.Tensor] | tuple[torch.Tensor, ...]:
        """The form torch-pruning calls a model with (a dict as keywords, a tuple as positional arguments)."""
        return tuple(self.tensors.values()) if self.positional else dict(self.tensors)

    def numpy(self) -> dict[str, np.ndarray]:
        """ONNX Runtime feeds by input name."""
        return {name: t.detach().cpu().numpy() for name, t in self.tensors.items()}

    def bind(self, model: nn.Module, aliases: Mapping[str, str] | None = None) -> Inputs:
        """These inputs named and ordered as `model.forward` takes them; raises DataError for an input
        the model requires that the data lacks, or an array the model has no parameter for.

        `aliases` maps the names the data uses to the parameters they feed (an ONNX upload's input
        names to its converted module's); the data and the errors speak of the inputs by those names.
        """
        params = _forward_parameters(model)
        if params is None:
            return Inputs(self.tensors, positional=True)
        aliases = aliases or {}
        public = {parameter: name for name, parameter in aliases.items()}
        parameters, required_parameters, open_ended = params
        names = [public.get(p, p) for p in parameters]
        required = [public.get(p, p) for p in required_parameters]
        tensors = dict(self.tensors)
        if list(tensors) == [UNNAMED] and UNNAMED not in names:
            candidates = required or names
            if len(candidates) == 1:
                tensors = {candidates[0]: tensors[UNNAMED]}
        missing = [name for name in required if name not in tensors]
        extra = [] if open_ended else [name for name in tensors if name not in names]
        if missing or extra:
            problems = ([f"the model requires {', '.join(missing)}"] if missing else []) + \
                       ([f"the model has no input named {', '.join(extra)}"] if extra else [])
            raise DataError(f"The data's arrays do not match the model's inputs: {'; '.join(problems)} "
                            f"(found: {', '.join(tensors)}; expected: {_expected(names, required)}).",
                            hint=_HINT, code="missing_input" if missing else "unexpected_input")
        order = [name for name in names if name in tensors] + [name for name in tensors if name not in names]
        return Inputs({aliases.get(name, name): tensors[name] for name in order})

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        return Inputs({name: fn(t) for name, t in self.tensors.items()}, self.positional)


def _forward_parameters(model: nn.Module) -> tuple[list[str], list[str], bool] | None:
    """(all parameter names, the required ones, whether **kwargs takes more) of `model.forward`;
    None when it takes *args (or has no inspectable signature), which only a positional call fits."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    named = [p for p in parameters if p.kind is not p.VAR_KEYWORD]
    return ([p.name for p in named], [p.name for p in named if p.default is p.empty],
            any(p.kind is p.VAR_KEYWORD for p in parameters))


def _expected(names: list[str], required: list[str]) -> str:
    return ", ".join(name if name in required else f"{name} (optional)" for name in names) or "none"
