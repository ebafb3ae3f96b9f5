"""Every model format an upload or a local file can arrive in, detected by content, with
one loader per format and one dispatch (`open_model`).

Formats: ONNX (converted to PyTorch), safetensors weights + an allow-listed architecture,
a zipped Hugging Face model directory, and pickled modules (only when the caller allows
running the file's code). `package.module:factory` is the CLI's way to build the user's
own local code.
"""

from __future__ import annotations

import importlib
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from core.errors import InputFileError, OptionsError, first_line
from core.inputs import Inputs
from core.intake import architectures
from core.intake.archives import (
    ZipLimits,
    extract,
    holds_only_arrays,
    is_zip,
    member_path,
    open_zip,
    read_member,
    safe_members,
)
from core.intake.hf import CONFIG_MAX_BYTES, WEIGHTS_FILES, check_config_json, load_hf_directory, weights_missing
from core.intake.loaded import LoadedModel
from core.options import IntakeOptions

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_SAVE_HINT = (
    "Save the whole module with torch.save(model, path), or pass package.module:factory with --weights."
)
_FORMATS_HINT = (
    "Upload an ONNX file, safetensors weights with an architecture (e.g. torchvision:resnet18), "
    "or a zipped Hugging Face model directory."
)


def is_factory_spec(spec: str) -> bool:
    """True when `spec` names a factory; an existing file of the same name takes precedence."""
    return FACTORY_SPEC.match(spec) is not None and not Path(spec).exists()


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """The model named by `spec` for a local, trusted caller (pickles allowed), in eval mode on the CPU."""
    return open_model(spec, IntakeOptions(allow_pickle=True), weights=weights).module


def open_model(spec: str | Path, intake: IntakeOptions, weights: str | Path | None = None) -> LoadedModel:
    """Dispatch on what `spec` is: a factory reference, or a file whose format is read from its bytes."""
    if isinstance(spec, str) and is_factory_spec(spec):
        loaded = LoadedModel(_build_from_factory(spec), "factory")
        if weights is not None:
            _load_safetensors(loaded.module, Path(weights))
    else:
        if weights is not None:
            raise OptionsError(
                "--weights is only used with a package.module:factory model.",
                hint="Drop --weights: a model file saved with torch.save already holds its weights.",
            )
        path = Path(spec)
        loader = _LOADERS[detect_format(path, intake)]
        loaded = loader(path, intake)
    loaded.module = loaded.module.cpu().eval()
    return loaded


def detect_format(path: Path, intake: IntakeOptions) -> str:
    """The model format of `path`, from its first bytes (and a zip's member names)."""
    size = check_input_file(path, "model", intake.max_file_bytes, _FORMATS_HINT)
    with path.open("rb") as handle:
        head = handle.read(16)
    if is_zip(path):
        return _zip_format(path)
    if head[:1] == b"\x80":
        return "pickle"
    if _looks_like_safetensors(head, size):
        return "safetensors"
    # An ONNX ModelProto starts with field 1 (ir_version, a varint); other formats are ruled out above.
    if head[:1] == b"\x08":
        return "onnx"
    raise InputFileError(f"{path.name} is not a model file this service reads.", hint=_FORMATS_HINT,
                         code="unknown_model_format")


def check_input_file(path: Path, what: str, max_bytes: int, hint: str) -> int:
    """The size of `path`, after refusing a missing, empty or oversized file."""
    if not path.is_file():
        raise InputFileError(f"The {what} file {path} was not found (or is not a file).", hint=hint)
    size = path.stat().st_size
    if size == 0:
        raise InputFileError(f"The {what} file {path.name} is empty.", hint=hint, code="empty_file")
    if size > max_bytes:
        raise InputFileError(f"The {what} file is {size / 1e6:.0f} MB; at most {max_bytes / 1e6:.0f} MB are "
                             "accepted.", hint="Upload a smaller file, or ask the operator to raise "
                             "IDAP_MAX_UPLOAD_BYTES.", code="file_too_large")
    return size


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    header_len = int.from_bytes(head[:8], "little")
    return len(head) > 8 and 0 < header_len <= size - 8 and head[8:9] == b"{"


def _zip_format(path: Path) -> str:
    with open_zip(path) as archive:
        names = [name.replace("\\", "/") for name in archive.namelist()]
    basenames = {name.rsplit("/", 1)[-1] for name in names}
    if "config.json" in basenames:
        return "hf"
    if any(name.endswith("constants.pkl") for name in names):
        return "torchscript"
    if "data.pkl" in basenames:
        return "pickle"
    if holds_only_arrays(names):
        raise InputFileError(f"{path.name} is an .npz data file, not a model.",
                             hint="Pass it as the data file.", code="unknown_model_format")
    raise InputFileError(f"{path.name} is a zip without config.json, so it is not a Hugging Face model directory.",
                         hint="Zip the directory that save_pretrained wrote (config.json, model.safetensors, "
                         "tokenizer files).", code="unknown_model_format")


def _load_onnx(path: Path, intake: IntakeOptions) -> LoadedModel:
    from core.intake.onnx_io import load_onnx

    converted = load_onnx(path)
    return LoadedModel(converted.module, "onnx", example=converted.example, onnx_spec=converted.spec,
                       input_aliases=converted.parameters, notes=list(converted.notes))


def _load_weights(path: Path, intake: IntakeOptions) -> LoadedModel:
    if not intake.architecture:
        raise InputFileError(
            f"{path.name} holds weights only; the architecture they belong to is needed.",
            hint="Name it, e.g. architecture torchvision:resnet18(num_classes=10) or idap:digits.",
            code="architecture_required")
    arch = architectures.parse(intake.architecture)
    model = architectures.build(arch)
    _load_safetensors(model, path, f"the architecture {arch}")
    return LoadedModel(model, "safetensors", example=Inputs.single(architectures.example_input(arch, model)))


def _load_hf_zip(path: Path, intake: IntakeOptions) -> LoadedModel:
    limits = ZipLimits(intake.max_zip_members, intake.max_unpacked_bytes)
    scratch = Path(tempfile.mkdtemp(prefix="idap-hf-"))
    try:
        with open_zip(path) as archive:
            members = safe_members(archive, limits)
            folder = _checked_hf_folder(archive, members)
            extract(archive, members, scratch, limits)
        return load_hf_directory(scratch / folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _checked_hf_folder(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo]) -> PurePosixPath:
    """The folder of the shallowest config.json, checked before anything is unpacked (the members'
    paths and declared sizes are already): it names a supported classifier and its weights are there."""
    paths = {member_path(info): info for info in members}
    configs = sorted((path for path in paths if path.name == "config.json"), key=lambda path: len(path.parts))
    if not configs:
        raise InputFileError("The zip's config.json is not a file.", hint=_FORMATS_HINT, code="invalid_hf_model")
    check_config_json(read_member(archive, paths[configs[0]], CONFIG_MAX_BYTES))
    folder = configs[0].parent
    if not any(folder / name in paths for name in WEIGHTS_FILES):
        raise weights_missing()
    return folder


def _load_pickle(path: Path, intake: IntakeOptions) -> LoadedModel:
    _refuse_code_unless_allowed(path, intake, "a pickled PyTorch file")
    return LoadedModel(_load_pickled(path), "pickle")


def _load_torchscript(path: Path, intake: IntakeOptions) -> LoadedModel:
    _refuse_code_unless_allowed(path, intake, "a TorchScript archive")
    raise InputFileError(f"{path} is a TorchScript archive; pruning needs the Python module.", hint=_SAVE_HINT,
                         code="torchscript_not_supported")


def _refuse_code_unless_allowed(path: Path, intake: IntakeOptions, what: str) -> None:
    if not intake.allow_pickle:
        raise InputFileError(
            f"{path.name} is {what}; loading it would run code from the upload, which this service does not allow.",
            hint="Export the model to ONNX, or upload safetensors weights with an architecture name "
            "(the operator can allow pickles with IDAP_ALLOW_PICKLE=true).", code="pickle_not_allowed")


_LOADERS = {
    "onnx": _load_onnx,
    "safetensors": _load_weights,
    "hf": _load_hf_zip,
    "pickle": _load_pickle,
    "torchscript": _load_torchscript,
}


def _load_pickled(path: Path) -> nn.Module:
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
            f"{path} is not a readable PyTorch file ({exc.__class__.__name__}: {first_line(exc)}).",
            hint=_SAVE_HINT,
        ) from exc
    if isinstance(obj, torch.jit.ScriptModule):
        raise InputFileError(f"{path} is a TorchScript archive; pruning needs the Python module.", hint=_SAVE_HINT,
                             code="torchscript_not_supported")
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
            f"Cannot import {module_name} ({exc.__class__.__name__}: {first_line(exc)}).",
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
            f"{spec}() failed ({exc.__class__.__name__}: {first_line(exc)}).",
            hint="The factory must build the model without arguments.",
        ) from exc
    if not isinstance(model, nn.Module):
        raise InputFileError(
            f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module.",
            hint="Return the model from the factory.",
        )
    return model


def _load_safetensors(model: nn.Module, path: Path, source: str = "the model this factory builds") -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors_into

    if not path.is_file():
        raise InputFileError(f"Weights file not found: {path}.", hint="Pass an existing .safetensors file.")
    try:
        # Unlike a plain load_state_dict, this resolves tensors the file stores once for several names.
        missing, unexpected = load_safetensors_into(model, path, strict=False)
    except SafetensorError as exc:
        raise InputFileError(
            f"{path.name} is not a readable .safetensors file ({first_line(exc)}).",
            hint="Save it with safetensors.torch.save_model(model, path).", code="invalid_safetensors",
        ) from exc
    except RuntimeError as exc:  # load_state_dict reports shape mismatches this way
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise InputFileError(
            f"{path.name} does not fit {source}: {'; '.join(mismatches[:3]) or first_line(exc)}.",
            hint="Use weights saved from that architecture, or name the architecture (and arguments such as "
            "num_classes) the weights were trained with.", code="weights_mismatch",
        ) from exc
    if missing or unexpected:
        problems = [f"{label} keys {', '.join(sorted(keys)[:5])}{' …' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InputFileError(
            f"{path.name} does not match {source}: {'; '.join(problems)}.",
            hint="Use the weights saved from that architecture.", code="weights_mismatch",
        )

