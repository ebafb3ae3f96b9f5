"""The handler for a run's task: the one the caller chose, or the one `auto` infers from the model's
outputs and class (and says why)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from core.graph.outputs import named_outputs, select_output
from core.inputs import Inputs
from core.tasks.base import TaskHandler
from core.tasks.classification import Classification
from core.tasks.detection import DenseDetection, Detection, decode
from core.tasks.embedding import EMBEDDING_OUTPUTS, Embedding
from core.tasks.generic import Generic
from core.tasks.kinds import DetectionDecoder, Task
from core.tasks.language import CausalLM
from core.tasks.segmentation import Segmentation

HANDLERS: dict[Task, type[TaskHandler]] = {
    Task.CLASSIFICATION: Classification,
    Task.EMBEDDING: Embedding,
    Task.DETECTION: Detection,
    Task.SEGMENTATION: Segmentation,
    Task.CAUSAL_LM: CausalLM,
    Task.GENERIC: Generic,
}


def handler_for(task: Task, output: str | None, result: Any,
                decoder: DetectionDecoder = DetectionDecoder.AUTO) -> TaskHandler:
    """The handler of `task` for a model whose output on a small batch is `result`."""
    if task is Task.AUTO:
        raise ValueError("Task.AUTO is resolved by infer_task first.")
    if task is Task.DETECTION:
        if decoder is DetectionDecoder.AUTO and decode(result) is None:
            return DenseDetection(output)
        return Detection(output, decoder)
    return HANDLERS[task](output)


def _vocabulary(model: nn.Module) -> set[int]:
    return {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}


def _spatial_inputs(example: Inputs) -> set[tuple[int, ...]]:
    return {tuple(s.shape[-2:]) for s in example.signature if len(s.shape) == 3 and s.dtype.is_floating_point}


def infer_task(model: nn.Module, output: Any, example: Inputs, chosen_output: str | None) -> tuple[Task, str]:
    """The task `output` (the model's, on `example`) fits, and why, in words for the preflight and the report."""
    name = type(model).__name__
    if decode(output) is not None:
        return Task.DETECTION, "the model returns boxes, scores and labels"
    named = named_outputs(output)
    out = select_output(output, chosen_output)  # an output the caller named and the model lacks is an error
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return Task.CAUSAL_LM, f"the model is a {name}"
    sequences = [s for s in example.signature if s.is_sequence]
    if out.ndim == 3 and sequences and out.shape[-1] in _vocabulary(model) and "logits" in named:
        return Task.CAUSAL_LM, f"its logits score every position over a {out.shape[-1]}-token vocabulary"
    segmenter_map = output.get("out") if isinstance(output, Mapping) else out
    if isinstance(segmenter_map, torch.Tensor) and segmenter_map.ndim == 4 and \
            tuple(segmenter_map.shape[-2:]) in _spatial_inputs(example):
        return Task.SEGMENTATION, "its output is a per-pixel map the size of the input image"
    has_logits = any(key.rsplit(".", 1)[-1] == "logits" for key in named)
    if chosen_output is None and not has_logits and any(
            key.rsplit(".", 1)[-1] in EMBEDDING_OUTPUTS for key in named):
        return Task.EMBEDDING, "its outputs are hidden states or embeddings, with no logits"
    if out.ndim == 3 and sequences and out.is_floating_point():
        return Task.EMBEDDING, "its output is a vector per token of a token sequence"
    if out.ndim == 2 and out.is_floating_point():
        return Task.CLASSIFICATION, "its output is a score per class (N×classes)"
    return Task.GENERIC, f"no task's outputs fit its output of shape {tuple(out.shape)}"
