"""ONNX in: reading an uploaded .onnx file safely and converting it to a prunable PyTorch module.

The converted module is an onnx2torch fx.GraphModule whose forward parameters are named after
the ONNX inputs; the pipeline prunes it like any other model, and `OnnxSpec` carries the original
interface (names, dtypes, dynamic axes of every input and output) to the export.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import external_data_helper
from torch import nn

from core.errors import DataError, InputFileError, first_line
from core.export.spec import BATCH_AXIS_NAME, ONNX_RELATIVE_TOLERANCE, OnnxSpec, onnx_input_dtype
from core.graph.outputs import named_outputs
from core.inputs import Inputs
from core.intake.fx_shapes import Shapes, flatten_start, shapes_at
from core.intake.onnx_attention import prunable_heads
from core.intake.onnx_ops import linear_layers, register_converters, residual_additions

_REEXPORT_HINT = (
    "Re-export the model with torch.onnx.export(model, example, 'model.onnx', input_names=['input'], "
    "output_names=['logits'], dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}}) and upload that file."
)
# Protobuf cannot hold more than 2 GiB; bigger models need external data, which uploads cannot carry.
_MAX_PROTO_BYTES = 2**31 - 1
# The batch and sequence length of an example without data: dynamic batch axes take the first, the
# second axis of an integer input (token ids, a mask) the second
_EXAMPLE_SIZES = (2, 8)
# Other sizes, to tell a reshape that holds for any batch and sequence from one that holds for these
_OTHER_SIZES = (3, 5)


@dataclass
class OnnxModel:
    module: nn.Module  # eval mode, on the CPU
    spec: OnnxSpec
    notes: list[str]
    parameters: dict[str, str]  # ONNX input name -> the module's forward parameter it feeds
    example: Inputs | None = None  # inputs of the declared shapes (bound), when every axis can be chosen

    def bind(self, inputs: Inputs) -> Inputs:
        """`inputs`, named like the ONNX inputs (a single one may be x), as the module takes them."""
        return inputs.bind(self.module, self.parameters)


def load_onnx(path: Path) -> OnnxModel:
    """Read, check, simplify and convert an ONNX classifier; every problem with the file is an InputFileError."""
    path = Path(path)
    proto = _read(path)
    _load_external_data(proto, path)
    _check(proto, path)
    spec, notes = _spec_of(proto, path)
    slimmed = _slim(proto, notes)
    _require_used_inputs(proto, slimmed, path)
    proto = slimmed
    register_converters()
    _require_converters(proto, path)
    module = _convert(proto, path)
    linear_layers(module)
    residual_additions(module)
    # the module takes the inputs in the converted graph's order, which the export must follow
    spec.input_names = [value.name for value in _graph_inputs(proto)]
    parameters = _name_parameters(module, spec.input_names)
    reshapes = _constant_reshapes(module)
    example = _example_inputs(proto, spec, parameters)
    if reshapes and example is not None:
        _generalise_constant_reshapes(module, reshapes, example, path)
    if example is not None:
        other = _example_inputs(proto, spec, parameters, _OTHER_SIZES)
        assert other is not None  # the same axes as the example's are dynamic
        module, head_notes = prunable_heads(module, [example, other])
        notes += head_notes
    elif reshapes:
        notes.append(f"{len(reshapes)} reshape(s) to a constant shape were left as they are (the input has dynamic "
                     "axes besides the batch and a token sequence); pruning the channels that reach them would "
                     "break the model.")
    return OnnxModel(module=module.eval(), spec=spec, notes=notes, parameters=parameters, example=example)


def _read(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise InputFileError(f"ONNX file not found: {path}.", hint="Pass an existing .onnx file.",
                             code="file_not_found")
    size = path.stat().st_size
    if size == 0:
        raise InputFileError(f"{path.name} is empty (0 bytes).", code="invalid_onnx",
                             hint=f"The upload may have failed; send the file again. {_REEXPORT_HINT}")
    if size > _MAX_PROTO_BYTES:
        raise InputFileError(f"{path.name} is larger than 2 GiB, the most a single ONNX file can hold.",
                             hint="Compress a smaller model.", code="invalid_onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf reports corrupt bytes as DecodeError, RuntimeError or worse
        raise InputFileError(
            f"{path.name} is not a readable ONNX model (damaged or truncated file: {first_line(exc)}).",
            hint=f"Check that the whole file was uploaded. {_REEXPORT_HINT}", code="invalid_onnx",
        ) from exc
    if not proto.graph.node or not proto.graph.output:
        # protobuf happily parses many byte strings into a message with no graph at all
        raise InputFileError(f"{path.name} is not an ONNX model: it holds no graph.",
                             hint=_REEXPORT_HINT, code="invalid_onnx")
    return proto


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the graph, its node attributes and its subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Pull in tensors stored in files beside the model; refuse any reference that leaves its directory."""
    external = [t for t in _all_tensors(proto.graph) if external_data_helper.uses_external_data(t)]
    if not external:
        return
    base = path.parent.resolve()
    for tensor in external:
        location = external_data_helper.ExternalDataInfo(tensor).location
        target = _external_file(location, base)
        if target is None:
            raise InputFileError(
                f"{path.name} stores tensor {tensor.name!r} in {location!r}, outside the model's directory.",
                hint="Save the weights inside the model file: onnx.save(onnx.load(path), 'model.onnx', "
                "save_as_external_data=False), or re-export with torch.onnx.export.",
                code="onnx_external_data",
            )
        if not target.is_file():
            raise InputFileError(
                f"{path.name} stores tensor {tensor.name!r} in a separate file {location!r}, which is missing.",
                hint="Uploads are a single file: save the weights inside the model with "
                "onnx.save(onnx.load(path), 'model.onnx', save_as_external_data=False).",
                code="onnx_external_data",
            )
    try:
        external_data_helper.load_external_data_for_model(proto, str(base))
    except Exception as exc:  # offsets or lengths past the end of the data file, and the like
        raise InputFileError(f"The external data of {path.name} cannot be read ({first_line(exc)}).",
                             hint="Save the weights inside the model file.", code="onnx_external_data") from exc


def _external_file(location: str, base: Path) -> Path | None:
    """The data file `location` names, or None when it is absolute or points out of `base`."""
    if not location:
        return None
    for flavour in (PurePosixPath, PureWindowsPath):
        pure = flavour(location)
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            return None
    target = (base / location).resolve()
    # a symlink beside the model may still lead elsewhere
    return target if target.is_relative_to(base) else None


def _check(proto: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # ValidationError, and C++ errors surfacing as other types
        raise InputFileError(f"{path.name} is not a valid ONNX model: {first_line(exc)}.",
                             hint=_REEXPORT_HINT, code="invalid_onnx") from exc


def _graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    # before IR version 4, initializers were listed among the inputs too
    initializers = {t.name for t in proto.graph.initializer}
    return [value for value in proto.graph.input if value.name not in initializers]


def _spec_of(proto: onnx.ModelProto, path: Path) -> tuple[OnnxSpec, list[str]]:
    """The interface to export the pruned model with (every input and output), and notes on what cannot be kept."""
    inputs, outputs = _graph_inputs(proto), list(proto.graph.output)
    others = [value.name for value in inputs if not value.type.HasField("tensor_type")]
    if not inputs or others:
        found = f"inputs that are not tensors ({', '.join(others)})" if others else "no inputs"
        raise InputFileError(f"{path.name} takes {found}; a classifier takes one or more input tensors.",
                             hint="Export the model with tensors (images, features, token ids) as its inputs.",
                             code="unsupported_onnx_inputs")
    fixed = [value.name for value in inputs if 0 not in _dynamic_axes(value)]
    notes = [f"Input(s) {', '.join(map(repr, fixed))} have a fixed batch size; the pruned model takes any batch "
             "size."] if fixed else []
    spec = OnnxSpec(
        input_names=[value.name for value in inputs],
        output_names=[value.name for value in outputs],
        dynamic_axes={value.name: _dynamic_axes(value) for value in [*inputs, *outputs]},
        input_dtypes={value.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name
                      for value in inputs},
    )
    return spec, notes


def _dynamic_axes(value: onnx.ValueInfoProto) -> dict[int, str]:
    """Axes without a fixed size, named by their dim_param (the batch axis, unnamed, is "batch")."""
    axes = {}
    for index, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            continue
        axes[index] = dim.dim_param or (BATCH_AXIS_NAME if index == 0 else f"{value.name}_dim{index}")
    return axes


def _slim(proto: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """onnxslim folds constants and fuses ops, leaving fewer, plainer ops to convert and prune."""
    import onnxslim

    try:
        slimmed = onnxslim.slim(proto)
    except Exception as exc:  # slimming is an optimisation; the original graph is still usable
        notes.append(f"onnxslim could not simplify the graph ({exc.__class__.__name__}); converted it as is.")
        return proto
    if not isinstance(slimmed, onnx.ModelProto):
        notes.append("onnxslim could not simplify the graph; converted it as is.")
        return proto
    return slimmed


def _require_used_inputs(original: onnx.ModelProto, slimmed: onnx.ModelProto, path: Path) -> None:
    """onnxslim drops inputs no output depends on, and so does torch.onnx.export: the pruned model
    could not keep such an input of the interface."""
    kept = {value.name for value in _graph_inputs(slimmed)}
    unused = [value.name for value in _graph_inputs(original) if value.name not in kept]
    if unused:
        raise InputFileError(
            f"{path.name} declares input(s) {', '.join(unused)} that none of its outputs depend on; the pruned "
            "model could not keep them.", hint="Export the model without the inputs it does not use.",
            code="unused_onnx_inputs",
        )


def _require_converters(proto: onnx.ModelProto, path: Path) -> None:
    """Name every op onnx2torch has no converter for, instead of failing on the first one."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {_domain(opset.domain): opset.version for opset in proto.opset_import}
    missing: dict[str, None] = {}
    for node in proto.graph.node:
        domain = _domain(node.domain)
        version = opsets.get(domain, 0)
        try:
            get_converter(operation_type=node.op_type, version=version, domain=domain)
        except NotImplementedError:
            missing[f"{node.op_type} ({domain or 'ai.onnx'} opset {version})"] = None
    if missing:
        raise InputFileError(
            f"{path.name} uses ops that cannot be converted to PyTorch for pruning: {', '.join(missing)}.",
            hint="Export the model with standard ONNX ops (torch.onnx.export, opset 13-17), replacing custom "
            "layers by plain PyTorch ones.", code="unsupported_onnx_ops",
        )


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _convert(proto: onnx.ModelProto, path: Path) -> fx.GraphModule:
    from onnx2torch import convert

    try:
        return convert(proto)
    except NotImplementedError as exc:  # ops onnx2torch knows, but not with these attributes
        raise InputFileError(f"{path.name} uses an op setting that cannot be converted to PyTorch: "
                             f"{first_line(exc)}.", hint=_REEXPORT_HINT, code="unsupported_onnx_ops") from exc
    except Exception as exc:  # the converter's other failures all come from the graph it was given
        raise InputFileError(f"{path.name} could not be converted to PyTorch ({exc.__class__.__name__}: "
                             f"{first_line(exc)}).", hint=_REEXPORT_HINT, code="onnx_conversion_failed") from exc


def _name_parameters(module: fx.GraphModule, names: list[str]) -> dict[str, str]:
    """Name the module's forward parameters (onnx2torch numbers them input_1, ...) after the ONNX inputs,
    as far as Python allows; returns ONNX input name -> parameter name."""
    placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
    # a parameter must not shadow a name the generated code uses (another node, a global like torch)
    used = set(re.findall(r"\w+", module.code)) | {"self"}
    parameters: dict[str, str] = {}
    for node, name in zip(placeholders, names, strict=True):
        parameter = re.sub(r"\W", "_", name)
        if not parameter or parameter[0].isdigit() or keyword.iskeyword(parameter):
            parameter = "_" + parameter
        while (parameter in used and parameter != node.name) or parameter in parameters.values():
            parameter += "_"
        # the generated forward takes the placeholder's target as its parameter
        node.target = parameter
        parameters[name] = parameter
    module.recompile()
    return parameters


def _example_inputs(proto: onnx.ModelProto, spec: OnnxSpec, parameters: dict[str, str],
                    sizes: tuple[int, int] = _EXAMPLE_SIZES) -> Inputs | None:
    """Inputs of the declared shapes for sizing a model without data: zeros (ones for a mask), a dynamic
    batch and sequence of `sizes` (the sequence for an integer input only); None when another
    axis is dynamic, since no size can be chosen for it."""
    tensors = {}
    for value in _graph_inputs(proto):
        dtype = getattr(torch, spec.input_dtypes[value.name])
        shape = [_example_size(axis, dim, dtype, sizes) for axis, dim in enumerate(value.type.tensor_type.shape.dim)]
        if not shape or None in shape:
            return None
        fill = torch.ones if "mask" in value.name.lower() else torch.zeros
        tensors[parameters[value.name]] = fill([size for size in shape if size is not None], dtype=dtype)
    return Inputs(tensors)


def _example_size(axis: int, dim: onnx.TensorShapeProto.Dimension, dtype: torch.dtype,
                  sizes: tuple[int, int]) -> int | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    if axis == 0:
        return sizes[0]
    return sizes[1] if axis == 1 and not dtype.is_floating_point else None


def _constant_reshapes(module: fx.GraphModule) -> list[fx.Node]:
    """Reshape nodes whose target shape is a stored constant rather than computed from the input."""
    from onnx2torch.node_converters.reshape import OnnxReshape

    return [node for node in module.graph.nodes
            if node.op == "call_module" and isinstance(module.get_submodule(str(node.target)), OnnxReshape)
            and len(node.args) == 2 and getattr(node.args[1], "op", None) == "get_attr"]


def _generalise_constant_reshapes(module: fx.GraphModule, reshapes: list[fx.Node], example: Inputs,
                                  path: Path) -> None:
    """Turn reshapes to constant shapes that flatten trailing axes into torch.flatten.

    A constant target such as [1, 512] hard-codes the batch and the channel count: it breaks
    at other batch sizes and as soon as pruning removes channels. When the output keeps the
    leading axes of the input and folds the rest into one, it is flatten(start_dim=k), which
    holds for any batch and width. Other constant reshapes are left alone.
    """
    shapes = _shapes_at(module, reshapes, example, path)
    for node in reshapes:
        start = flatten_start(*shapes[node.name]) if node.name in shapes else None
        if start is None:
            continue
        with module.graph.inserting_before(node):
            flat = module.graph.call_function(torch.flatten, (node.args[0], start))
        node.replace_all_uses_with(flat)
        module.graph.erase_node(node)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()


def _shapes_at(module: fx.GraphModule, nodes: list[fx.Node], example: Inputs, path: Path) -> dict[str, Shapes]:
    try:
        return shapes_at(module, nodes, example)
    except Exception as exc:  # the converted graph fails on inputs of its own declared shapes
        raise InputFileError(
            f"{path.name} converts to PyTorch but fails on inputs of shapes {_shapes(example)} "
            f"({exc.__class__.__name__}: {first_line(exc)}).", hint=_REEXPORT_HINT, code="onnx_conversion_failed",
        ) from exc


def _shapes(inputs: Inputs) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in inputs.tensors.items())


@torch.no_grad()
def check_conversion(model: OnnxModel, onnx_path: Path, sample: Inputs) -> float:
    """Max abs difference, over every output, between ONNX Runtime on the original file and the converted
    module on `sample` (bound to the module: OnnxModel.bind).

    Raises InputFileError (code onnx_conversion_mismatch) past ONNX_RELATIVE_TOLERANCE relative.
    """
    sample = sample.to("cpu")
    expected = _run_original(model, Path(onnx_path), sample)
    converted = list(named_outputs(sample.call(model.module.eval())).values())
    if len(converted) != len(expected):
        raise InputFileError(
            f"The converted model has {len(converted)} outputs where the ONNX model has {len(expected)}.",
            hint=_REEXPORT_HINT, code="onnx_conversion_mismatch",
        )
    return max(_agreement(name, output.numpy(), reference)
               for name, output, reference in zip(model.spec.output_names, converted, expected))


def _agreement(name: str, got: np.ndarray, expected: np.ndarray) -> float:
    """Max abs difference of one output; raises past ONNX_RELATIVE_TOLERANCE of its scale."""
    if got.shape != expected.shape:
        raise InputFileError(
            f"The converted model outputs shape {got.shape} where ONNX Runtime gives {expected.shape} for {name!r}.",
            hint=_REEXPORT_HINT, code="onnx_conversion_mismatch",
        )
    # as float64: outputs may be integers or booleans (a mask), which numpy does not subtract
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    max_abs = float(np.abs(got - expected).max(initial=0.0))
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    if max_abs / scale > ONNX_RELATIVE_TOLERANCE:
        raise InputFileError(
            f"The PyTorch conversion of the ONNX model disagrees with ONNX Runtime on {name!r}: max abs diff "
            f"{max_abs:.3g} ({max_abs / scale:.3g} relative, limit {ONNX_RELATIVE_TOLERANCE}).",
            hint=f"The model uses an op whose conversion is not exact. {_REEXPORT_HINT}",
            code="onnx_conversion_mismatch",
        )
    return max_abs


def _run_original(model: OnnxModel, onnx_path: Path, sample: Inputs) -> list[np.ndarray]:
    """Every output of the ONNX model on `sample` (fed by ONNX input name), in the graph's order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # the file passed onnx.checker, but ORT can still refuse it
        raise InputFileError(f"ONNX Runtime cannot load {onnx_path.name}: {first_line(exc)}.",
                             hint=_REEXPORT_HINT, code="invalid_onnx") from exc
    declared = {arg.name: arg for arg in session.get_inputs()}
    feed = {name: sample.tensors[parameter].numpy().astype(onnx_input_dtype(declared[name].type))
            for name, parameter in model.parameters.items()}
    # a model exported at a fixed batch size runs on the sample in slices of that size
    fixed = [arg.shape[0] for arg in declared.values() if arg.shape and isinstance(arg.shape[0], int)]
    step = fixed[0] if fixed else len(sample)
    try:
        slices = [session.run(model.spec.output_names, {name: array[i : i + step] for name, array in feed.items()})
                  for i in range(0, len(sample), step)]
        return [np.concatenate(parts) for parts in zip(*slices)]
    except Exception as exc:  # wrong rank, shape or size for this model
        shapes = ", ".join(f"{name} {array.shape[1:]}" for name, array in feed.items())
        expected = ", ".join(f"{name} {declared[name].shape}" for name in feed)
        raise DataError(
            f"The ONNX model rejects inputs of shapes {shapes} (per sample); it declares {expected}: "
            f"{first_line(exc)}.", hint="Store each input with the shape the model takes, samples on the first axis.",
            code="onnx_input_mismatch",
        ) from exc

