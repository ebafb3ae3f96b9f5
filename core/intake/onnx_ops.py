"""What onnx2torch lacks for transformer exports: converters for ops it knows under older opset
versions only, Gelu, Reshape with allowzero (as the dynamo exporter writes them), a Flatten that
follows ONNX on every axis, and Linear layers where it leaves a
MatMul by a constant weight (what torch.onnx makes of a Linear on 3-D inputs), which torch-pruning
cannot prune."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from core.graph.blocks import Addition

# Op versions whose schema changed only in the tensor types it allows (bfloat16, float8, int4), so the
# converter of the earlier version computes the same thing. BERT's exported attention mask uses
# GreaterOrEqual; torch.onnx's dynamo exporter writes opset 20, where Shape, Cast, Reshape and the
# like have such newer versions.
_SAME_SINCE = {
    ("GreaterOrEqual", 16): 12, ("LessOrEqual", 16): 12,
    ("Shape", 19): 15, ("Shape", 21): 15, ("Cast", 19): 13, ("Cast", 21): 13, 
    ("IsNaN", 20): 13, ("Constant", 19): 13, ("Constant", 21): 13, ("ConstantOfShape", 20): 9,
    ("ConstantOfShape", 21): 9, ("Identity", 19): 16, ("Identity", 21): 16, ("Unsqueeze", 21): 13,
    ("Transpose", 21): 13,
}
_GELU_VERSIONS = (20,)
_RESHAPE_VERSIONS = (14, 19, 21)
_FLATTEN_VERSIONS = (9, 11, 13, 21)


class Flatten(nn.Module):
    """ONNX Flatten: a 2-D [prod(shape[:axis]), prod(shape[axis:])]. onnx2torch's fails for axis equal
    to the rank, which BERT's exported attention mask uses (Flatten(axis=2) of [batch, sequence])."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis + x.dim() if self.axis < 0 else self.axis
        if axis == 0:
            return x.reshape(1, -1)
        # flatten, not reshape to computed sizes: an export keeps the batch and sequence axes dynamic
        leading = torch.flatten(x, end_dim=axis - 1)
        return leading.unsqueeze(1) if axis == x.dim() else torch.flatten(leading, start_dim=1)


def register_converters() -> None:
    """Add the missing converters to onnx2torch's registry and replace its Flatten (idempotent)."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter

    _export_opset_visible()

    for (op_type, version), known in _SAME_SINCE.items():
        if OperationDescription("", op_type, version) not in _CONVERTER_REGISTRY:
            add_converter(operation_type=op_type, version=version)(
                _CONVERTER_REGISTRY[OperationDescription("", op_type, known)])
    for version in _FLATTEN_VERSIONS:
        # add_converter refuses to replace a converter; the registry is a plain dict
        _CONVERTER_REGISTRY[OperationDescription("", "Flatten", version)] = _convert_flatten
    for version in _RESHAPE_VERSIONS:
        _CONVERTER_REGISTRY[OperationDescription("", "Reshape", version)] = _convert_reshape
    for version in _GELU_VERSIONS:
        _CONVERTER_REGISTRY[OperationDescription("", "Gelu", version)] = _convert_gelu


def _export_opset_visible() -> None:
    """Converted Shape, Squeeze and Reduce ops read the export's opset from torch.onnx.symbolic_helper.GLOBALS.
    Once anything imports torch.onnx.symbolic_helper as a module (transformers does), that name is torch's
    backward-compatibility shim, which lacks GLOBALS, and exporting the pruned model fails; point
    onnx2torch at the module that has it."""
    from onnx2torch.utils import common

    if not hasattr(common.symbolic_helper, "GLOBALS"):
        from torch.onnx._internal.torchscript_exporter import symbolic_helper

        common.symbolic_helper = symbolic_helper


def _convert_flatten(node: Any, graph: Any) -> Any:
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    axis = node.attributes.get("axis", 1)
    # a plain nn.Flatten where it is one: torch-pruning follows channels through it
    module = nn.Flatten(start_dim=1) if axis == 1 else Flatten(axis)
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node=node))


def _convert_reshape(node: Any, graph: Any) -> Any:
    """Reshape with or without allowzero (the dynamo exporter sets it): they differ only where the target
    shape holds a 0, which a non-empty tensor never has under allowzero=1, since its size would not match."""
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    return OperationConverterResult(torch_module=OnnxReshape(), onnx_mapping=onnx_mapping_from_node(node=node))


def _convert_gelu(node: Any, graph: Any) -> Any:
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    approximate = node.attributes.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    return OperationConverterResult(torch_module=nn.GELU(approximate=approximate),
                                    onnx_mapping=onnx_mapping_from_node(node=node))


def linear_layers(module: fx.GraphModule) -> None:
    """Replace MatMul(x, W) with a constant 2-D W, and the Add of a constant bias that follows it, by
    an nn.Linear computing the same, in place."""
    from onnx2torch.node_converters.matmul import OnnxMatMul

    replaced = False
    for node in list(module.graph.nodes):
        if node.op != "call_module" or not isinstance(module.get_submodule(str(node.target)), OnnxMatMul):
            continue
        weight = stored_tensor(module, node.args[1])
        if weight is None or weight.dim() != 2:
            continue
        bias_node, bias = _bias_after(module, node, weight.shape[1])
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            if bias is not None:
                linear.bias.copy_(bias)
        # named after the MatMul it replaces (a dot would make it a submodule path)
        name = f"{str(node.target).replace('.', '_')}/Linear"
        module.add_submodule(name, linear)
        last = bias_node or node
        with module.graph.inserting_after(last):
            new = module.graph.call_module(name, (node.args[0],))
        last.replace_all_uses_with(new)
        for old in (bias_node, node):
            if old is not None:
                module.graph.erase_node(old)
        replaced = True
    if replaced:
        module.graph.eliminate_dead_code()
        module.delete_all_unused_submodules()
        module.recompile()


def residual_additions(module: fx.GraphModule) -> None:
    """Make each Add of two computed tensors an Addition, the module Stage 2 looks for in a flat graph, in
    place (an Add of a stored constant is a bias, not a residual)."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        op = module.get_submodule(str(node.target))
        if not isinstance(op, OnnxBinaryMathOperation) or op.math_op_function is not torch.add or op.broadcast \
                or len(node.args) != 2 or node.kwargs:
            continue
        if all(isinstance(arg, fx.Node) and arg.op != "get_attr" for arg in node.args):
            module.set_submodule(str(node.target), Addition())


def stored_tensor(module: fx.GraphModule, arg: object) -> torch.Tensor | None:
    """The stored tensor `arg` reads, when it is a get_attr node."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    value = module
    for part in str(arg.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def _bias_after(module: fx.GraphModule, matmul: fx.Node, width: int) -> tuple[fx.Node | None, torch.Tensor | None]:
    """The Add node that is the MatMul's only user and adds a constant vector of `width`, and that vector."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    users = list(matmul.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None, None
    (add,) = users
    op = module.get_submodule(str(add.target))
    if not isinstance(op, OnnxBinaryMathOperation) or op.math_op_function is not torch.add or op.broadcast:
        return None, None
    other = next((arg for arg in add.args if arg is not matmul), None)
    bias = stored_tensor(module, other)
    if bias is None or tuple(bias.shape) != (width,) or len(add.args) != 2:
        return None, None
    return add, bias
