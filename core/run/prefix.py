"""Probes that do not recompute what they cannot change.

A drift probe (core.run.allocation) changes only the modules its plan touches; every residual block or
transformer layer that finishes before the first of them starts computes on the probe's inputs exactly
what it computed for the reference. Their outputs are kept from the reference pass and stand in for
them: a probe of a group in layer 20 of 30 runs ten layers. Only a prefix of the blocks (in execution
order) is kept, as much as PREFIX_CACHE_BYTES holds, and the stand-ins are checked once against the
reference before any probe relies on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.graph.blocks import find_blocks
from core.inputs import Inputs
from core.tasks.base import Records, TaskHandler, collect

# The reference outputs kept for the probes of one step: on a GPU worker they sit next to the model.
PREFIX_CACHE_BYTES = 2 << 30


@dataclass
class _Order:
    """When each module starts and finishes in one forward pass, as positions in one sequence of events."""

    modules: set[nn.Module] = field(default_factory=set)  # all of the model's, whether they ran or not
    start: dict[nn.Module, int] = field(default_factory=dict)
    end: dict[nn.Module, int] = field(default_factory=dict)


def _execution_order(model: nn.Module, example: Inputs) -> _Order:
    order = _Order(set(model.modules()))
    clock = iter(range(1 << 62))

    def started(module: nn.Module, _args: Any) -> None:
        order.start.setdefault(module, next(clock))

    def ended(module: nn.Module, _args: Any, _output: Any) -> None:
        order.end[module] = next(clock)

    handles = [hook for module in model.modules() for hook in (
        module.register_forward_pre_hook(started), module.register_forward_hook(ended))]
    try:
        with torch.no_grad():
            example.call(model.eval())
    finally:
        for handle in handles:
            handle.remove()
    return order


def _nbytes(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_nbytes(item) for item in output)
    if isinstance(output, dict):
        return sum(_nbytes(item) for item in output.values())
    return 0


@dataclass
class PrefixCache:
    """The outputs of the model's first blocks on the probes' inputs, batch by batch, and the reference
    records of those inputs."""

    model: nn.Module
    order: _Order
    outputs: dict[nn.Module, list[Any]]  # block -> its output for each batch, blocks in execution order
    reference: Records

    @classmethod
    def record(cls, model: nn.Module, example: Inputs, x: Inputs, device: torch.device,
               task: TaskHandler) -> PrefixCache:
        """The reference records of `model` on `x`, collected while keeping its blocks' outputs; blocks
        past PREFIX_CACHE_BYTES, and every block if standing in for them changes the outputs, are not kept."""
        order = _execution_order(model, example)
        # a residual Addition of a flat graph stands in for nothing: its branch runs anyway
        blocks = sorted((model.get_submodule(b.name) for b in find_blocks(model, example) if b.skip is None),
                        key=lambda m: order.end.get(m, 1 << 62))
        outputs: dict[nn.Module, list[Any]] = {block: [] for block in blocks}
        handles = [block.register_forward_hook(lambda m, _args, out: outputs[m].append(out)) for block in blocks]
        try:
            reference = collect(model, x, device, task)
        finally:
            for handle in handles:
                handle.remove()
        cache = cls(model, order, _within(outputs, PREFIX_CACHE_BYTES), reference)
        if cache.outputs and not cache._stands_in(x, device, task):
            cache.outputs = {}
        return cache

    def _stands_in(self, x: Inputs, device: torch.device, task: TaskHandler) -> bool:
        """Whether the model's outputs are unchanged with every kept block standing in."""
        with self._standing_in(list(self.outputs)):
            records = collect(self.model, x, device, task)
        return _same(records, self.reference)

    @contextmanager
    def skipping(self, touched: list[nn.Module]) -> Iterator[None]:
        """Within the block, the kept blocks that finish before any of `touched` starts return their kept
        outputs instead of running."""
        # torch-pruning's stand-ins for functional operations are not the model's modules and never run
        starts = [self.order.start.get(m) for m in touched if m in self.order.modules]
        first = min(s for s in starts if s is not None) if all(s is not None for s in starts) and starts else -1
        before = [block for block in self.outputs if self.order.end.get(block, 1 << 62) < first]
        with self._standing_in(before):
            yield

    @contextmanager
    def _standing_in(self, blocks: list[nn.Module]) -> Iterator[None]:
        for block in blocks:
            kept = iter(self.outputs[block])
            # an instance attribute shadows the class's forward for this module only
            block.forward = lambda *_args, _kept=kept, **_kwargs: next(_kept)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for block in blocks:
                del block.forward


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _within(outputs: dict[nn.Module, list[Any]], budget: int) -> dict[nn.Module, list[Any]]:
    """The longest prefix of `outputs` (in its order) whose tensors fit in `budget` bytes."""
    kept: dict[nn.Module, list[Any]] = {}
    used = 0
    for block, batches in outputs.items():
        used += sum(_nbytes(out) for out in batches)
        if used > budget:
            break
        kept[block] = batches
    return kept
