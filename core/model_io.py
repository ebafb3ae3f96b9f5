"""Loading the model to compress from a pickled file or from `package.module:factory` + safetensors."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from core.errors import InputFileError, OptionsError

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_SAVE_HINT = (
    "Save the whole module with torch.save(model, path), or pass package.module:factory with --weights."
)


def is_factory_spec(spec: str) -> bool:
    """True when `spec` names a factory; an existing file of the same name takes precedence."""
    return FACTORY_SPEC.match(spec) is not None and not Path(spec).exists()


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """The model named by `spec`, in eval mode on the CPU.

    `spec` is a file written by `torch.save(model, path)` (unpickling runs code from the
    file: only for local files the user trusts) or `package.module:factory`, whose
    factory is called without arguments and then gets `weights` (a .safetensors file).
    """
    if is_factory_spec(spec):
        model = _build_from_factory(spec)
        if weights is not None:
            _load_safetensors(model, Path(weights))
    else:
        if weights is not None:
            raise OptionsError(
                "--weights is only used with a package.module:factory model.",
                hint="Drop --weights: a model file saved with torch.save already holds its weights.",
            )
        model = _load_pickled(Path(spec))
    return model.cpu().eval()


def _load_pickled(path: Path) -> nn.Module:
    if not path.exists():
        raise InputFileError(f"Model file not found: {path}.", hint=f"Pass an existing file. {_SAVE_HINT}")
    if not path.is_file():
        raise InputFileError(f"{path} is not a file.", hint=_SAVE_HINT)
    try:
        with warnings.catch_warnings():
            # A TorchScript archive is refused below with a clearer message than torch's notice.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as exc:
        # Pickles store classes by reference; a class defined in a script's __main__ is not importable here.
        raise InputFileError(
            f"{path} needs a class that cannot be imported here ({exc}).",
            hint="Define the model class in an importable module (on PYTHONPATH) and save it again, "
            "or pass package.module:factory with --weights.",
        ) from exc
    except Exception as exc:  # unpickling surfaces corrupt input as many unrelated exception types
        raise InputFileError(
            f"{path} is not a readable PyTorch file ({exc.__class__.__name__}: {_first_line(exc)}).",
            hint=_SAVE_HINT,
        ) from exc
    if isinstance(obj, torch.jit.ScriptModule):
        raise InputFileError(
            f"{path} is a TorchScript archive; pruning needs the Python module.", hint=_SAVE_HINT
        )
    if not isinstance(obj, nn.Module):
        raise InputFileError(f"{path} is not a PyTorch model (it holds {_describe(obj)}).", hint=_SAVE_HINT)
    return obj


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
            return "a state dict: weights without the model's code"
        keys = ", ".join(repr(key) for key in list(obj)[:5])
        return f"a dict with keys {keys}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


def _build_from_factory(spec: str) -> nn.Module:
    module_name, factory_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # importing user code can fail in any way; all of it is the user's to fix
        raise InputFileError(
            f"Cannot import {module_name} ({exc.__class__.__name__}: {_first_line(exc)}).",
            hint="Install the package or run from the directory that contains it.",
        ) from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InputFileError(f"{module_name} has no callable {factory_name}.",
                             hint="Check the name after the ':'.")
    try:
        model = factory()
    except Exception as exc:  # the factory is user code
        raise InputFileError(
            f"{spec}() failed ({exc.__class__.__name__}: {_first_line(exc)}).",
            hint="The factory must build the model without arguments.",
        ) from exc
    if not isinstance(model, nn.Module):
        raise InputFileError(
            f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module.",
            hint="Return the model from the factory.",
        )
    return model


def _load_safetensors(model: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors_into

    if not path.is_file():
        raise InputFileError(f"Weights file not found: {path}.", hint="Pass an existing .safetensors file.")
    try:
        # Unlike a plain load_state_dict, this resolves tensors the file stores once for several names.
        missing, unexpected = load_safetensors_into(model, path, strict=False)
    except SafetensorError as exc:
        raise InputFileError(
            f"{path} is not a readable .safetensors file ({_first_line(exc)}).",
            hint="Save it with safetensors.torch.save_model(model, path).",
        ) from exc
    except RuntimeError as exc:  # load_state_dict reports shape mismatches this way
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise InputFileError(
            f"{path} does not fit the model: {'; '.join(mismatches[:3]) or _first_line(exc)}.",
            hint="Use the weights saved from this architecture.",
        ) from exc
    if missing or unexpected:
        problems = [f"{label} keys {', '.join(sorted(keys)[:5])}{' …' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InputFileError(
            f"{path} does not match the model: {'; '.join(problems)}.",
            hint="Use the weights saved from the model this factory builds.",
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
