"""Flow-divergence scores (method §2 and §4), computed with forward hooks.

Filter scores: one forward pass over the calibration set per scoring, never one pass
per filter. Block scores: one pass for all candidate blocks together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from core.data import batches
from core.graph.blocks import BlockCandidate
from core.graph.layers import compensates
from core.importance.statistics import CalibrationPass, InputMoments, InputStats, run_calibration, token_rows
from core.inputs import Inputs
from core.options import Criterion
from core.tasks.base import TaskHandler

_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)

# What the planner asks of a criterion: one score per channel of a dependency group (None when it
# cannot score the group), the torch-pruning importance interface that DivergenceScorer also follows.
GroupScorer = Callable[[tp.dependency.Group], torch.Tensor | None]
# The layers whose output units filter divergence scores.
ScoredLayer = nn.modules.conv._ConvNd | nn.Linear


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


# Traced ops are known by their backward's name only. F.relu6 traces as hardtanh and an ONNX Clip as clamp,
# without their bounds: both are taken as ReLU6, the one clamp that follows convolutions in practice
# (MobileNet, EfficientNet-Lite); pairs with other bounds fail direct_consumers' check and go unpaired.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu6": lambda t: torch.clamp(t, 0, 6), "hardtanh": lambda t: torch.clamp(t, 0, 6),
    "clamp": lambda t: torch.clamp(t, 0, 6), "relu": torch.relu, "gelu": nn.functional.gelu,
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
def direct_consumers(model: nn.Module, graph: tp.DependencyGraph, batch: Inputs) -> dict[nn.Module, nn.Module]:
    """Layers whose output, after the BatchNorm and the activation that follow them, is exactly the
    input of one other layer that mixes channels densely (a Linear with a bias, or an ungrouped
    convolution: core.graph.layers), checked on `batch` (an architecture-independent test:
    traced graphs put reshapes and matmul nodes between two Linears). Only for such a pair is the
    mean output of a removed unit exact to fold into the consumer's bias (see `compensate`)."""
    layers = [m for m in graph.module2node if isinstance(m, ScoredLayer)]
    produced: dict[nn.Module, torch.Tensor] = {}  # filled by the hooks on `layers`
    consumed: dict[nn.Module, torch.Tensor] = {}
    handles = []
    for layer in layers:
        if compensates(layer):

            def pre(_m: nn.Module, inputs: tuple, layer=layer) -> None:
                if inputs and isinstance(inputs[0], torch.Tensor):
                    consumed[layer] = inputs[0].detach()

            handles.append(layer.register_forward_pre_hook(pre))
        source = _follower_norms(graph, layer)
        # the same φ the score uses; without an activation the score's φ is ReLU, which the
        # consumer does not see, so such a layer gets no pair
        activation = _consumer_activation(graph, source)
        if activation is None:
            continue

        def post(_m: nn.Module, _inputs: tuple, output: torch.Tensor, layer=layer, activation=activation) -> None:
            if isinstance(output, torch.Tensor):
                produced[layer] = activation(output.detach())

        handles.append(source.register_forward_hook(post))
    model.eval()
    try:
        batch.call(model)
    finally:
        for handle in handles:
            handle.remove()
    pairs: dict[nn.Module, nn.Module] = {}
    for producer, out in produced.items():
        matches = [m for m, seen in consumed.items() if m is not producer
                   and seen.shape == out.shape and torch.allclose(seen, out, rtol=1e-5, atol=1e-6)]
        if len(matches) == 1 and _sole_reader(graph, _follower_norms(graph, producer), matches[0]):
            pairs[producer] = matches[0]
    return pairs


def _sole_reader(graph: tp.DependencyGraph, source: nn.Module, consumer: nn.Module) -> bool:
    """Whether `consumer` is the only layer that reads `source`'s output: the graph leads from one to
    the other through ops with one output each. A residual block's last layer also feeds the sum
    that a matching comparison cannot see; compensating only its next layer would leave the sum short."""
    node = graph.module2node.get(source)
    while node is not None and len(node.outputs) == 1:
        node = node.outputs[0]
        if node.module is consumer:
            return True
        if isinstance(node.module, ScoredLayer):
            return False
    return False


def filter_divergence(
    model: nn.Module,
    graph: tp.DependencyGraph,
    calib: Inputs,
    device: torch.device,
    batch_size: int,
    means_out: dict[nn.Module, tuple[nn.Module, InputStats]] | None = None,
    with_cov: bool = False,
) -> dict[nn.Module, torch.Tensor]:
    """s_i = mean_b ‖φ(A[b,i])‖₂ · ‖W[i]‖₂ / (C·H·W) for every Conv/Linear output unit.

    φ is the nonlinearity that follows the unit (method §2: the actual post-activation value of
    the consumer), ReLU when none does (the method's formula). With `means_out` (a dict to fill),
    layers that feed a dense layer directly (`direct_consumers`) are scored on φ(A) minus its
    calibration mean instead, and the consumer and the statistics of its inputs (with `with_cov`,
    their covariance too) are stored in `means_out` for `compensate`.
    """
    consumers = direct_consumers(model, graph, calib[:2].to(device)) if means_out is not None else {}
    calibration = CalibrationPass(model)
    finish = attach_filter_divergence(calibration, graph, consumers, means_out, with_cov)
    calibration.run(calib, device, batch_size)
    return finish()


def attach_filter_divergence(
    calibration: CalibrationPass,
    graph: tp.DependencyGraph,
    consumers: dict[nn.Module, nn.Module],
    means_out: dict[nn.Module, tuple[nn.Module, InputStats]] | None = None,
    with_cov: bool = False,
) -> Callable[[], dict[nn.Module, torch.Tensor]]:
    """`filter_divergence` as hooks of `calibration`, centring the layers in `consumers` (with
    `means_out` only); the returned function gives the scores (and fills `means_out`) once the pass ran."""
    layers = [m for m in graph.module2node if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    centre = set(consumers) if means_out is not None else set()
    # filled by the hooks for `layers`
    sums: dict[ScoredLayer, list[torch.Tensor]] = {}
    moments = {layer: InputMoments(with_cov) for layer in centre}
    squares: dict[ScoredLayer, list[torch.Tensor]] = {}
    positions: dict[ScoredLayer, int] = {}
    sizes: dict[ScoredLayer, int] = {}

    def hook_for(layer: ScoredLayer, channel_dim: int, activation: Callable[[torch.Tensor], torch.Tensor]):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor):
                return
            act = activation(output.detach().float())
            act = act.movedim(channel_dim, -1).reshape(act.shape[0], -1, act.shape[channel_dim])
            # per sample, Σ over positions; kept on the device until all batches ran: a copy per batch would
            # wait for the device each time
            squares.setdefault(layer, []).append(act.pow(2).sum(1))
            if layer in centre:
                sums.setdefault(layer, []).append(act.sum(1))
                moments[layer].add(*token_rows(act, calibration.tokens["mask"]))
            positions[layer] = act.shape[1]
            sizes[layer] = int(output[0].numel())

        return hook

    for layer in layers:
        source = _follower_norms(graph, layer)
        is_conv = isinstance(layer, nn.modules.conv._ConvNd)
        activation = _consumer_activation(graph, source) or torch.relu
        calibration.forward_hook(source, hook_for(layer, 1 if is_conv else -1, activation))

    @torch.no_grad()
    def finish() -> dict[nn.Module, torch.Tensor]:
        scores: dict[nn.Module, torch.Tensor] = {}
        for layer, parts in squares.items():
            sq = torch.cat(parts)  # samples x units
            if layer in centre:
                s1 = torch.cat(sums[layer])
                mean = s1.sum(0) / (len(s1) * positions[layer])
                # Σ_t (a_t − μ)² = Σ a_t² − 2μ Σ a_t + T μ², per sample
                sq = (sq - 2 * mean * s1 + positions[layer] * mean.pow(2)).clamp_min(0)
                assert means_out is not None  # `centre` is empty without it
                means_out[layer] = (consumers[layer], moments[layer].stats())
            total = sq.sqrt().sum(0)
            weight = layer.weight.detach().float()
            if isinstance(layer, nn.modules.conv._ConvNd) and getattr(layer, "transposed", False):
                weight = weight.transpose(0, 1)
            w_norm = weight.flatten(1).norm(dim=1).to(total.device)
            if w_norm.numel() != total.numel():
                continue
            scores[layer] = ((total / len(sq)) * w_norm / sizes[layer]).cpu()
        return scores

    return finish


class DivergenceScorer:
    """Group importance from per-layer divergence over the group's producing layers: their mean
    (to be normalised per group), or with `layer_sum` the sum of each layer's scores divided by
    that layer's mean (comparable across groups as it is)."""

    def __init__(self, layer_scores: dict[nn.Module, torch.Tensor], layer_sum: bool = False) -> None:
        self.layer_scores = layer_scores
        self.layer_sum = layer_sum

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
            if self.layer_sum:
                scores = scores / (scores.mean() + 1e-12)
            total.scatter_add_(0, torch.tensor(root_idxs), scores[list(idxs)])
            count += 1
        if total is None:
            return None
        return total if self.layer_sum else total / count


def taylor_gradients(model: nn.Module, calib: Inputs, labels: torch.Tensor | None,
                     device: torch.device, batch_size: int, task: TaskHandler) -> None:
    """Accumulate weight gradients of the task's loss (core.tasks) on the calibration set for first-order
    Taylor importance."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches(calib, batch_size)):
        batch = batch.to(device)
        target = labels[i * batch_size : i * batch_size + len(batch)].to(device) if labels is not None else None
        task.taylor_loss(batch.call(model), batch, target).backward()


def baseline_scorer(criterion: Criterion) -> GroupScorer:
    """torch-pruning's own importance criteria, for comparisons (no normaliser: the planner normalises; LAMP's
    normaliser is the criterion itself)."""
    if criterion == Criterion.L2:
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if criterion == Criterion.TAYLOR:
        return tp.importance.GroupTaylorImportance(normalizer=None)
    if criterion == Criterion.RANDOM:
        return tp.importance.RandomImportance()
    if criterion == Criterion.FPGM:
        return tp.importance.FPGMImportance(p=2, normalizer=None)
    if criterion == Criterion.LAMP:
        return tp.importance.LAMPImportance(p=2)
    if criterion == Criterion.BN_SCALE:
        return tp.importance.BNScaleImportance(normalizer=None)
    raise ValueError(f"Unknown criterion {criterion!r}.")


@torch.no_grad()
def block_divergence(
    model: nn.Module,
    blocks: Sequence[BlockCandidate],
    calib: Inputs,
    device: torch.device,
    batch_size: int,
    eps: float = 1e-8,
) -> dict[str, float]:
    """D_l = mean_x ‖T_out − T_in‖ / (‖T_in‖ + ε) per candidate block.

    T_in is what the block would be replaced by: its input, its shortcut's output with a projection,
    or the skip operand of a residual Addition in a flat graph (whose output is T_out).
    """
    # summed on the device: a float() per batch would wait for it every batch
    totals = {block.name: torch.zeros((), dtype=torch.float64, device=device) for block in blocks}
    reference: dict[str, torch.Tensor] = {}
    handles = []

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().flatten(1)

    for candidate in blocks:
        name = candidate.name
        block = model.get_submodule(name)
        if candidate.shortcut is None:
            position = candidate.skip or 0

            def pre(_m, inputs, name=name, position=position):
                reference[name] = flat(inputs[position])
            handles.append(block.register_forward_pre_hook(pre))
        else:
            def short(_m, _inputs, output, name=name):
                reference[name] = flat(output)
            handles.append(block.get_submodule(candidate.shortcut).register_forward_hook(short))

        def post(_m, _inputs, output, name=name):
            ref = reference.pop(name)
            out = flat(output)
            totals[name] += ((out - ref).norm(dim=1) / (ref.norm(dim=1) + eps)).sum().double()

        handles.append(block.register_forward_hook(post))
    run_calibration(model, calib, device, batch_size, handles, {"mask": None})
    return {name: float(total) / len(calib) for name, total in totals.items()}
