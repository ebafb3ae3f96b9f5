"""Intermediate features the student is matched on during recovery: where to tap them, and the
loss between the student's (mapped to the teacher's width) and the teacher's."""

from __future__ import annotations

import torch
from torch import nn

from core.graph.tracing import containers_called_once
from core.inputs import Inputs


def pick_feature_points(model: nn.Module, example: Inputs, count: int = 3) -> list[str]:
    """Names of ~`count` modules at early/middle/late depth whose outputs are feature maps.

    Takes the shallowest nesting level that has enough containers called once with a
    batched ≥3-D output (e.g. ResNet's layer1..4, MobileNet's features.0..18), so the
    names survive both channel pruning and block removal inside them.
    """
    usable = [
        call.name for call in containers_called_once(model, example)
        if call.output_shape is not None and len(call.output_shape) >= 3
    ]
    by_depth: dict[int, list[str]] = {}
    for name in usable:
        by_depth.setdefault(name.count("."), []).append(name)
    for depth in sorted(by_depth):
        names = by_depth[depth]
        if len(names) >= count:
            picks = sorted({max(round(len(names) * (i + 1) / count) - 1, 0) for i in range(count)})
            return [names[i] for i in picks]
    deepest = max(by_depth.values(), key=len, default=[])
    return deepest[-count:]


class FeatureTap:
    """Captures the outputs of named modules during a forward pass."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in names:
            def hook(_m, _inputs, output, name=name):
                if isinstance(output, torch.Tensor):
                    self.values[name] = output
            # a point inside a removed block or layer is gone from the student; the others still count
            if name in modules:
                self._handles.append(modules[name].register_forward_hook(hook))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _adapter(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module | None:
    """Maps student features to the teacher's width (1×1 conv, or linear over the last axis for
    token features batch×tokens×width) when they differ."""
    if student.shape == teacher.shape:
        return None
    if student.ndim == teacher.ndim == 3 and student.shape[:2] == teacher.shape[:2]:
        return nn.Linear(student.shape[2], teacher.shape[2], bias=False)
    if student.ndim != teacher.ndim or student.shape[2:] != teacher.shape[2:]:
        raise ValueError("incomparable")
    if student.ndim == 4:
        return nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False)
    if student.ndim == 3:
        return nn.Conv1d(student.shape[1], teacher.shape[1], 1, bias=False)
    raise ValueError("incomparable")


def feature_loss(s_tap: FeatureTap, t_tap: FeatureTap, adapters: dict[str, nn.Module | None],
                  optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    total = torch.zeros((), device=device)
    for name, t_feat in t_tap.values.items():
        s_feat = s_tap.values.get(name)
        if s_feat is None:
            continue
        if name not in adapters:
            try:
                adapter = _adapter(s_feat, t_feat)
            except ValueError:
                adapters[name] = None
                continue
            if adapter is not None:
                adapter.to(device)
                optimizer.add_param_group({"params": list(adapter.parameters())})
            adapters[name] = adapter
        adapter = adapters[name]
        mapped = adapter(s_feat) if adapter is not None else s_feat
        if mapped.shape == t_feat.shape:
            # in float32 whatever the autocast: bf16 features would round the loss's small differences away
            total = total + nn.functional.l1_loss(mapped.float(), t_feat.detach().float())
    return total
