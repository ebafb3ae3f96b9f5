"""Causal language models: next-token logits N×tokens×vocab on token ids; perplexity on the held-out
windows, its budget a relative increase. The tokens are their own labels: recovery always has the
next-token loss next to the distillation from the original's distributions."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.data import Dataset
from core.errors import DataError
from core.graph.outputs import select_output
from core.inputs import Inputs
from core.tasks.base import TaskHandler
from core.tasks.classification import distillation_kl
from core.tasks.embedding import attention_mask
from core.tasks.kinds import Metric, Task


def token_ids(batch: Inputs) -> torch.Tensor:
    """The batch's token ids: the input named input_ids, else its only integer input of one axis per sample."""
    named = next((t for name, t in batch.tensors.items() if "input_ids" in name), None)
    if named is not None:
        return named
    ids = [t for t in batch.tensors.values() if not t.is_floating_point() and t.ndim == 2]
    if len(ids) != 1:
        raise DataError("A causal language model needs its token ids as one integer input (input_ids).",
                        hint="Store the token windows as input_ids (int64, samples × tokens).", code="missing_input")
    return ids[0]


class CausalLM(TaskHandler):
    task = Task.CAUSAL_LM
    default_budget = 0.10
    eval_batch_size = 8  # windows × tokens × vocabulary logits per pass

    def may_augment(self, labeled: bool) -> bool:
        return False  # the tokens are the labels: a swapped token would be learnt as the next one

    def metric(self, labeled: bool) -> Metric:
        return Metric.PERPLEXITY

    def logits(self, output: Any) -> torch.Tensor:
        return select_output(output, self.output)

    def _shifted(self, output: Any, batch: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at each position but the last, the ids they predict, and which of those count (the mask)."""
        logits, ids = self.logits(output), token_ids(batch).to(self.logits(output).device)
        mask = attention_mask(batch)
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device).bool()
        return logits[:, :-1], ids[:, 1:], keep[:, 1:] & keep[:, :-1]

    def check(self, output: Any, data: Dataset) -> str:
        logits = self.logits(output)
        sample = data.inputs[: len(logits)]
        ids = token_ids(sample)
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise DataError(f"A causal language model's output is N×tokens×vocab logits over its input_ids "
                            f"{tuple(ids.shape)}; the model's has shape {tuple(logits.shape)}.",
                            hint="Name the logits output with --output, or choose another task.",
                            code="output_not_token_logits")
        if ids.shape[1] < 2:
            raise DataError("Perplexity needs windows of at least two tokens.", hint="Store longer token windows.",
                            code="sequence_too_short")
        if data.y is not None:
            raise DataError("A causal language model takes no labels: its token windows are their own targets.",
                            hint="Drop y from the data.", code="labels_wrong_format")
        return f"next-token logits over a {logits.shape[-1]}-token vocabulary"

    def record(self, output: Any, batch: Inputs) -> torch.Tensor:
        logits, targets, keep = self._shifted(output, batch)
        nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        return torch.stack([(nll * keep).sum(1), keep.sum(1)], dim=1).detach().double()

    def quality(self, records: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None) -> float:
        return float(torch.exp(records[:, 0].sum() / records[:, 1].sum().clamp(min=1)))

    def _nll(self, records: torch.Tensor) -> float:
        return float(records[:, 0].sum() / records[:, 1].sum().clamp(min=1))

    def agreement(self, records: torch.Tensor, reference: torch.Tensor) -> float:
        """The original's perplexity over this one: 1.0 when no worse."""
        return float(torch.exp(torch.tensor(min(self._nll(reference) - self._nll(records), 0.0))))

    def drift(self, records: torch.Tensor, reference: torch.Tensor) -> float:
        """The rise in mean next-token loss (log perplexity) over the original's."""
        return max(self._nll(records) - self._nll(reference), 0.0)

    def loss(self, student: Any, teacher: Any, batch: Inputs, labels: torch.Tensor | None, temperature: float,
             kd_weight: float) -> torch.Tensor:
        s_logits, targets, keep = self._shifted(student, batch)
        t_logits = self.logits(teacher)[:, :-1]
        s_kept, t_kept = s_logits[keep], t_logits[keep]
        soft = distillation_kl(s_kept, t_kept, temperature, dim=-1)
        return nn.functional.cross_entropy(s_kept.float(), targets[keep]) + kd_weight * soft

    def taylor_loss(self, output: Any, batch: Inputs, labels: torch.Tensor | None) -> torch.Tensor:
        logits, targets, keep = self._shifted(output, batch)
        return nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
