"""Learning rates per module for recovery: a module whose weights are far smaller than the model's usual
scale learns at a rate scaled down to its own size.

Adam moves every weight by about the learning rate whatever the weight's size. Exported graphs hold
layers whose weights are tiny because a scale that follows them is large (PP-OCRv4's detector, as
RapidOCR ships it, has a convolution with weights of mean |w| 2e-5 before a multiplication that restores
the scale): one AdamW step at 1e-5 moved them by half their size and the map by 96 % of its energy, so
every recovery broke the model. Scaling such a module's rate by its weights' RMS makes its steps as
relative as everybody else's; modules of ordinary scale keep the rate as given (README, Decisions).
"""

from __future__ import annotations

import statistics
from typing import Any

from torch import nn

# A module's weights count as out of scale below this fraction of the model's median weight RMS; one
# at the fraction or above learns at the full rate, so ordinary models train exactly as before.
OUT_OF_SCALE = 0.1


def _weight_rms(module: nn.Module) -> float | None:
    """The RMS of the module's own matrix or kernel (≥ 2-D `weight`); None for norms, biases-only and
    containers, which learn at the full rate."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.ndim < 2 or not weight.requires_grad:
        return None
    return float(weight.detach().float().pow(2).mean().sqrt())


def scaled_param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The trainable parameters of `model` as optimizer groups: each module's own parameters (weight and
    bias together) at `lr`, scaled down by rms / (OUT_OF_SCALE · median rms) where its weights are out of
    scale. Every trainable parameter is in exactly one group: a tied one (shared by modules) in its first
    module's."""
    seen: set[int] = set()
    owned: list[tuple[nn.Module, list[nn.Parameter]]] = []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            owned.append((module, params))
    scales = {id(module): rms for module, _ in owned if (rms := _weight_rms(module)) is not None}
    floor = OUT_OF_SCALE * statistics.median(scales.values()) if scales else 0.0
    groups: dict[float, list[nn.Parameter]] = {}
    for module, params in owned:
        rms = scales.get(id(module))
        factor = 1.0 if rms is None or rms >= floor else rms / floor
        groups.setdefault(factor, []).extend(params)
    return [{"params": params, "lr": lr * factor} for factor, params in groups.items()]
