"""Flow-divergence scores (method §2 and §4), computed with forward hooks.

Filter scores: one forward pass over the calibration set per scoring, never one pass
per filter. Block scores: one pass for all candidate blocks together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch_pruning as tp
from torch import nn

from core.surgery import GroupScorer

_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


def _batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


def _follower_norms(graph: tp.DependencyGraph, layer: nn.Module) -> nn.Module:
    """The module whose output scores `layer`: a BatchNorm that directly follows it, else itself.

    BN rescales channels, so the pre-BN norm would mislead (method §2 decision).
    """
    node = graph.module2node.get(layer)
    if node is not None and len(node.outputs) == 1:
        nxt = node.outputs[0].module
        if isinstance(nxt, nn.modules.batchnorm._BatchNorm):
            return nxt
    return layer


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu6": lambda t: torch.clamp(t, 0, 6), "relu": torch.relu, "gelu": nn.functional.gelu,
    "silu": nn.functional.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "hardswish": nn.functional.hardswish, "hardsigmoid": nn.functional.hardsigmoid,
}
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh",
                       nn.Sigmoid: "sigmoid", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid"}


def _consumer_activation(graph: tp.DependencyGraph, source: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The nonlinearity applied right after `source`, as a module or a functional op, if any."""
    node = graph.module2node.get(source)
    if node is None or len(node.outputs) != 1:
        return None
    consumer = node.outputs[0].module
    for kind, name in _ACTIVATION_MODULES.items():
        if isinstance(consumer, kind):
            return _ACTIVATIONS[name]
    if isinstance(consumer, tp.ops._ElementWiseOp):
        op = str(consumer._grad_fn).lower()
        # longest name first: "relu6" before "relu", "hardsigmoid" before "sigmoid"
        for name in sorted(_ACTIVATIONS, key=len, reverse=True):
            if op.startswith(name):
                return _ACTIVATIONS[name]
    return None


@torch.no_grad()
def filter_divergence(
    model: nn.Module,
    graph: tp.DependencyGraph,
    calib: torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> dict[nn.Module, torch.Tensor]:
    """s_i = mean_b ‖φ(A[b,i])‖₂ · ‖W[i]‖₂ / (C·H·W) for every Conv/Linear output unit.

    φ is the nonlinearity that follows the unit (method §2: the actual post-activation value of
    the consumer), ReLU when none does (the method's formula).
    """
    layers = [m for m in graph.module2node if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    sums: dict[nn.Module, torch.Tensor] = {}
    sizes: dict[nn.Module, int] = {}
    handles = []

    def hook_for(layer: nn.Module, channel_dim: int, activation: Callable[[torch.Tensor], torch.Tensor]):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor):
                return
            act = activation(output.detach().float())
            act = act.movedim(channel_dim, -1).reshape(act.shape[0], -1, act.shape[channel_dim])
            per_sample = act.norm(dim=1).sum(0)  # Σ_b ‖relu(A[b,i])‖₂
            sums[layer] = sums.get(layer, 0) + per_sample.cpu()
            sizes[layer] = int(output[0].numel())

        return hook

    for layer in layers:
        source = _follower_norms(graph, layer)
        is_conv = isinstance(layer, nn.modules.conv._ConvNd)
        activation = _consumer_activation(graph, source) or torch.relu
        handles.append(source.register_forward_hook(hook_for(layer, 1 if is_conv else -1, activation)))
    model.eval()
    try:
        for batch in _batches(calib, batch_size):
            model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()

    n = len(calib)
    scores = {}
    for layer, total in sums.items():
        weight = layer.weight.detach().float()
        if isinstance(layer, nn.modules.conv._ConvNd) and getattr(layer, "transposed", False):
            weight = weight.transpose(0, 1)
        w_norm = weight.flatten(1).norm(dim=1).cpu()
        if w_norm.numel() != total.numel():
            continue
        scores[layer] = (total / n) * w_norm / sizes[layer]
    return scores


class DivergenceScorer:
    """Group importance from per-layer divergence: mean over the group's producing layers."""

    def __init__(self, layer_scores: dict[nn.Module, torch.Tensor]) -> None:
        self.layer_scores = layer_scores

    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        count = 0
        for i, (dep, idxs) in enumerate(group):
            if dep.handler not in _OUT_FNS:
                continue
            scores = self.layer_scores.get(dep.target.module)
            root_idxs = group[i].root_idxs
            if scores is None or any(r is None for r in root_idxs):
                continue
            if total is None:
                total = torch.zeros(len(group[0].idxs))
            total.scatter_add_(0, torch.tensor(root_idxs), scores[list(idxs)])
            count += 1
        return None if total is None else total / count


def taylor_gradients(model: nn.Module, calib: torch.Tensor, labels: torch.Tensor | None,
                     device: torch.device, batch_size: int) -> None:
    """Accumulate weight gradients on the calibration set for first-order Taylor importance."""
    from core.metrics import logits_of

    model.eval()
    model.zero_grad(set_to_none=True)
    for i, batch in enumerate(_batches(calib, batch_size)):
        logits = logits_of(model(batch.to(device)))
        target = labels[i * batch_size : i * batch_size + len(batch)].to(device) if labels is not None \
            else logits.argmax(1).detach()
        nn.functional.cross_entropy(logits, target, reduction="sum").backward()


def baseline_scorer(criterion: str) -> GroupScorer:
    """torch-pruning's own importance criteria, for comparisons (no normaliser: the planner normalises)."""
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    if criterion == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"Unknown criterion {criterion!r}.")


@torch.no_grad()
def block_divergence(
    model: nn.Module,
    blocks: dict[str, str | None],
    calib: torch.Tensor,
    device: torch.device,
    batch_size: int,
    eps: float = 1e-8,
) -> dict[str, float]:
    """D_l = mean_x ‖T_out − T_in‖ / (‖T_in‖ + ε) per candidate block.

    `blocks` maps a block name to its shortcut submodule (relative name) or None for an
    identity shortcut; with a projection, T_in is the shortcut's output, the path the
    block would be replaced by.
    """
    totals = {name: 0.0 for name in blocks}
    reference: dict[str, torch.Tensor] = {}
    handles = []

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().flatten(1)

    for name, shortcut in blocks.items():
        block = model.get_submodule(name)
        if shortcut is None:
            def pre(_m, inputs, name=name):
                reference[name] = flat(inputs[0])
            handles.append(block.register_forward_pre_hook(pre))
        else:
            def short(_m, _inputs, output, name=name):
                reference[name] = flat(output)
            handles.append(block.get_submodule(shortcut).register_forward_hook(short))

        def post(_m, _inputs, output, name=name):
            ref = reference.pop(name)
            out = flat(output)
            totals[name] += float(((out - ref).norm(dim=1) / (ref.norm(dim=1) + eps)).sum())

        handles.append(block.register_forward_hook(post))
    model.eval()
    try:
        for batch in _batches(calib, batch_size):
            model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / len(calib) for name, total in totals.items()}
