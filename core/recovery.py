"""Recovery fine-tuning by knowledge distillation from the model before the step (method §5)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from core.data import Dataset
from core.metrics import logits_of
from core.progress import Reporter
from core.tracing import containers_called_once


def pick_feature_points(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
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


class _FeatureTap:
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


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


def iterations_for(n: int, batch_size: int, epochs: float, iterations: int | None) -> int:
    if iterations is not None:
        return iterations
    return math.ceil(epochs * n / min(batch_size, n))


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    feature_points: list[str],
    iterations: int,
    *,
    device: torch.device,
    batch_size: int,
    lr: float,
    weight_decay: float,
    temperature: float,
    kd_weight: float,
    feature_weight: float,
    seed: int,
    reporter: Reporter,
) -> None:
    """Fine-tune `student` in place for `iterations` steps.

    loss = CE(student, labels) + kd_weight·KL + w·Σ L1(adapter(f_s), f_t) with labels, KL being
    KL(student ‖ teacher) at temperature T scaled by T²; without labels the task term is KL alone.
    Cancellation is checked every iteration.
    """
    if iterations <= 0:
        return
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    s_tap, t_tap = _FeatureTap(student, feature_points), _FeatureTap(teacher, feature_points)
    adapters: dict[str, nn.Module | None] = {}
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batches = _shuffled_batches(len(data), min(batch_size, len(data)), generator)
    try:
        for _ in range(iterations):
            reporter.check_cancel()
            index = next(batches)
            x = data.x[index].to(device)
            with torch.no_grad():
                t_logits = logits_of(teacher(x))
            s_logits = logits_of(student(x))
            soft = nn.functional.kl_div(
                nn.functional.log_softmax(s_logits / temperature, dim=1),
                nn.functional.log_softmax(t_logits / temperature, dim=1),
                log_target=True,
                reduction="batchmean",
            ) * temperature**2
            if data.y is not None:
                loss = nn.functional.cross_entropy(s_logits, data.y[index].to(device)) + kd_weight * soft
            else:
                loss = soft
            loss = loss + feature_weight * _feature_loss(s_tap, t_tap, adapters, optimizer, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        s_tap.close()
        t_tap.close()
        student.eval()
        for p in teacher.parameters():
            p.requires_grad_(True)


def _feature_loss(s_tap: _FeatureTap, t_tap: _FeatureTap, adapters: dict[str, nn.Module | None],
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
            total = total + nn.functional.l1_loss(mapped, t_feat.detach())
    return total

