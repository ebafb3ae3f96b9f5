"""The allow-listed architectures that safetensors weights can be loaded into.

A reference is `registry:name` with optional literal keyword arguments, e.g.
`torchvision:resnet18(num_classes=10)` or `idap:digits`. Only names from these registries
are built, and arguments are parsed as literals: an upload can never name code to run.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.errors import InputFileError

_HINT = "Use e.g. torchvision:resnet18(num_classes=10) or idap:digits."


@dataclass(frozen=True)
class Architecture:
    registry: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.registry}:{self.name}" + (f"({args})" if args else "")


def _idap_models() -> dict[str, Callable[..., nn.Module]]:
    from core.examples import DigitsNet

    return {"digits": DigitsNet}


def _torchvision_models() -> dict[str, Callable[..., nn.Module]]:
    import torchvision

    # Classification models only: the engine compresses classifiers.
    return {name: _torchvision_builder(name) for name in torchvision.models.list_models(module=torchvision.models)}


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        import torchvision

        # weights=None: nothing may be downloaded, and the upload brings its own weights.
        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


REGISTRIES: dict[str, Callable[[], dict[str, Callable[..., nn.Module]]]] = {
    "torchvision": _torchvision_models,
    "idap": _idap_models,
}


def parse(spec: str) -> Architecture:
    registry, sep, rest = spec.strip().partition(":")
    if not sep or registry not in REGISTRIES:
        raise InputFileError(
            f"Unknown architecture reference {spec!r}: it must start with "
            f"{' or '.join(f'{r}:' for r in REGISTRIES)}.", hint=_HINT, code="unknown_architecture")
    try:
        node = ast.parse(rest.strip(), mode="eval").body
    except SyntaxError as exc:
        raise InputFileError(f"Cannot parse architecture reference {spec!r}.", hint=_HINT,
                             code="invalid_architecture") from exc
    if isinstance(node, ast.Name):
        return Architecture(registry, node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError as exc:
            raise InputFileError(f"Arguments of {spec!r} must be literals (numbers, strings, booleans).",
                                 hint=_HINT, code="invalid_architecture") from exc
        if len(kwargs) == len(node.keywords):
            return Architecture(registry, node.func.id, kwargs)
    raise InputFileError(f"Cannot parse architecture reference {spec!r}: expected name or name(key=value, ...).",
                         hint=_HINT, code="invalid_architecture")


def build(arch: Architecture) -> nn.Module:
    models = REGISTRIES[arch.registry]()
    if arch.name not in models:
        close = difflib.get_close_matches(arch.name, list(models), n=3)
        raise InputFileError(
            f"Unknown {arch.registry} architecture {arch.name!r}.",
            hint=f"Did you mean {', '.join(close)}?" if close else f"Known: {', '.join(sorted(models)[:12])}, ...",
            code="unknown_architecture")
    try:
        return models[arch.name](**arch.kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise InputFileError(f"{arch} cannot be built: {exc}.",
                             hint="Pass only constructor arguments this architecture accepts.",
                             code="invalid_architecture") from exc


def example_input(arch: Architecture, model: nn.Module) -> torch.Tensor:
    """Two inputs of the size the architecture is made for (ImageNet size for torchvision)."""
    if arch.registry == "idap":
        return torch.rand(2, 1, 8, 8)
    side = 299 if arch.name == "inception_v3" else 224
    return torch.rand(2, 3, side, side)
