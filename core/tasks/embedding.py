"""Embedding models: a vector per sample (a pooled sentence embedding, or token states mean-pooled over the
attention mask); cosine similarity to the original's embeddings, or retrieval recall@10 when labels say
which samples belong together."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.data import Dataset
from core.errors import DataError
from core.graph.outputs import named_outputs, select_output
from core.inputs import Inputs
from core.tasks.base import TaskHandler
from core.tasks.kinds import Metric, Task
from core.tasks.metrics import recall_at_k

# Outputs that hold an embedding, best first: sentence-transformers' own, then token states to pool
# (all-MiniLM and most sentence encoders mean-pool them; BERT's pooler_output was trained for another head).
EMBEDDING_OUTPUTS = ("sentence_embedding", "embeddings", "last_hidden_state", "pooler_output")
RECALL_K = 10


def attention_mask(batch: Inputs) -> torch.Tensor | None:
    """The batch's attention mask (an input whose name holds "attention_mask"), if it has one."""
    return next((t for name, t in batch.tensors.items() if "attention_mask" in name), None)


class Embedding(TaskHandler):
    task = Task.EMBEDDING
    default_budget = 0.02

    def metric(self, labeled: bool) -> Metric:
        return Metric.RECALL_AT_10 if labeled else Metric.COSINE

    def chosen(self, output: Any) -> torch.Tensor:
        if self.output is None:
            named = named_outputs(output)
            name = next((n for n in EMBEDDING_OUTPUTS for key in named if key.rsplit(".", 1)[-1] == n), None)
            if name is not None:
                return next(t for key, t in named.items() if key.rsplit(".", 1)[-1] == name)
        return select_output(output, self.output)

    def embedding(self, output: Any, batch: Inputs) -> torch.Tensor:
        """The N×D embedding: a N×L×D output is mean-pooled over the tokens the attention mask keeps."""
        out = self.chosen(output).float()
        if out.ndim == 2:
            return out
        mask = attention_mask(batch)
        weights = torch.ones(out.shape[:2], device=out.device) if mask is None else mask.to(out.device).float()
        return (out * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)

    def check(self, output: Any, data: Dataset) -> str:
        out = self.chosen(output)
        if out.ndim not in (2, 3) or not out.is_floating_point():
            raise DataError(f"An embedding output is N×dims or N×tokens×dims (floats); the model's has shape "
                            f"{tuple(out.shape)}.", hint="Name the output that holds the embedding with --output.",
                            code="output_not_embedding")
        if data.y is not None:
            if data.y.ndim != 1 or data.y.dtype.is_floating_point:
                raise DataError(f"Embedding labels are one integer group id per sample (samples with the same id "
                                f"belong together); got {data.y.dtype} labels of shape {tuple(data.y.shape)}.",
                                hint="Store y as int64 of shape (N,), or drop y to compare with the original.",
                                code="labels_wrong_format")
            if len(torch.unique(data.y)) == len(data.y):
                raise DataError("Every embedding label is different, so no sample has a partner to retrieve.",
                                hint="Give samples that belong together (a query and its match) the same id.",
                                code="labels_wrong_format")
        pooled = " (token states mean-pooled over the attention mask)" if out.ndim == 3 else ""
        return f"{out.shape[-1]}-dimensional embeddings{pooled}"

    def record(self, output: Any, batch: Inputs) -> torch.Tensor:
        return self.embedding(output, batch).detach()

    def quality(self, records: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None) -> float:
        if labels is not None:
            return recall_at_k(records, labels, RECALL_K)
        return self.agreement(records, reference)

    def agreement(self, records: torch.Tensor, reference: torch.Tensor) -> float:
        return float(nn.functional.cosine_similarity(records.double(), reference.double(), dim=1).mean())

    def drift(self, records: torch.Tensor, reference: torch.Tensor) -> float:
        return 1.0 - self.agreement(records, reference)

    def loss(self, student: Any, teacher: Any, batch: Inputs, labels: torch.Tensor | None, temperature: float,
             kd_weight: float) -> torch.Tensor:
        # Labels (group ids) only measure retrieval: random batches seldom hold both of a pair, so an in-batch
        # contrastive loss would see no positives; distillation keeps the geometry the retrieval relies on.
        s, t = self.embedding(student, batch), self.embedding(teacher, batch)
        return (1.0 - nn.functional.cosine_similarity(s, t, dim=1)).mean()

    def taylor_loss(self, output: Any, batch: Inputs, labels: torch.Tensor | None) -> torch.Tensor:
        return self.embedding(output, batch).pow(2).sum()
