"""Removing attention heads: q/k/v rows, the output projection's columns, and the head count."""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.graph.attention import AttentionSite
from core.importance.statistics import InputStats
from core.inputs import Inputs
from core.surgery.compensation import compensate


def remove_heads(model: nn.Module, site: AttentionSite, heads: list[int], stats: InputStats | None = None) -> None:
    """Remove `heads` in place: q/k/v output rows, the output projection's input columns, and the
    module's head counts (and all-heads size). Under grouped-query attention a head is a key-value
    group: its key and value rows, and the rows of the query heads that share them. With `stats` (of
    the output projection's inputs), the projection makes up for the removed heads first
    (`compensate`)."""
    module = model.get_submodule(site.name)
    count = site.num_heads(model)
    keep_heads = [h for h in range(count) if h not in set(heads)]
    out = model.get_submodule(site.out)
    # find_sites records a site only when its q/k/v and output projections are all nn.Linear
    assert isinstance(out, nn.Linear)
    width = site.unit_width
    if stats is not None and out.bias is not None:
        compensate(out, [h * width + i for h in heads for i in range(width)], stats)
    device = out.weight.device
    for attr, rows in zip(site.qkv, site.rows_per_unit(), strict=True):
        _keep_rows(getattr(module, attr), _units(keep_heads, rows, device))
    # still the module at site.out: compensation changes its parameters in place
    _keep_columns(out, _units(keep_heads, width, device))
    if site.count_attr is not None:
        setattr(module, site.count_attr, len(keep_heads) * site.query_group)
    if site.kv_count_attr is not None:
        setattr(module, site.kv_count_attr, len(keep_heads))
    if site.size_attr is not None:
        setattr(module, site.size_attr, len(keep_heads) * width)


def _units(units: list[int], width: int, device: torch.device) -> torch.Tensor:
    """The indices of `units` in a tensor of consecutive `width`-wide units."""
    return torch.tensor([u * width + i for u in units for i in range(width)], device=device, dtype=torch.long)


def _keep_rows(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach().index_select(0, keep).clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, keep).clone())
    linear.out_features = len(keep)


def _keep_columns(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach().index_select(1, keep).clone())
    linear.in_features = len(keep)


def removable(model: nn.Module, site: AttentionSite, example: Inputs) -> bool:
    """Whether the model still runs with one head of `site` removed (checked on a copy): the
    module's forward may use attributes this code does not know about."""
    if site.num_heads(model) < 2:
        return False
    trial = copy.deepcopy(model)
    try:
        remove_heads(trial, site, [0])
        with torch.no_grad():
            example.call(trial.eval())
    except Exception:  # any failure means the module cannot lose heads this way
        return False
    return True
