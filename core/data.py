"""Calibration data as the method sees it: a dataset, its check against the model, the held-out
split, and batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import DataError
from core.graph.outputs import named_outputs, select_output
from core.inputs import Inputs


@dataclass
class Dataset:
    """The model's inputs (N samples each) and optional integer labels `y` (N)."""

    inputs: Inputs
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def labeled(self) -> bool:
        return self.y is not None

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.inputs[index], None if self.y is None else self.y[index])

    def bound(self, model: nn.Module, aliases: Mapping[str, str] | None = None) -> Dataset:
        """The same data with its inputs named as `model.forward` takes them (Inputs.bind)."""
        return Dataset(self.inputs.bind(model, aliases), self.y)


def split(data: Dataset, eval_fraction: float, seed: int, min_eval: int = 1) -> tuple[Dataset, Dataset]:
    """Deterministic split into (recovery, held-out evaluation)."""
    n = len(data)
    n_eval = min(max(int(round(n * eval_fraction)), min_eval), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_eval:]), data.subset(order[:n_eval])


def batches(inputs: Inputs, batch_size: int) -> Iterator[Inputs]:
    """`inputs` in consecutive slices of `batch_size` samples (the last one shorter)."""
    for i in range(0, len(inputs), batch_size):
        yield inputs[i : i + batch_size]


@torch.no_grad()
def check_against_model(model: nn.Module, data: Dataset, device: torch.device, output: str | None) -> int:
    """Run one small batch of `data` (bound to `model`); return the number of classes the model's
    `output` (see core.graph.outputs.select_output) holds."""
    sample = data.inputs[: min(2, len(data))].to(device)
    handles = [m.register_forward_pre_hook(_integer_ids(sample)) for m in model.modules()
               if isinstance(m, nn.Embedding)]
    try:
        result = sample.call(model)
    except DataError:
        raise
    except Exception as exc:  # the model decides what it accepts; any failure is the data's shape
        signature = sample.signature
        shapes = str(signature[0].shape) if len(signature) == 1 else \
            ", ".join(f"{s.name} {s.shape}" for s in signature)
        raise DataError(
            f"The model rejects inputs of shape {shapes} (per sample): "
            f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "),
            hint="Store the inputs with the shape the model was trained on, samples on the first axis.",
            code="data_shape_mismatch",
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    out = select_output(result, output)
    if out.ndim != 2:
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in named_outputs(result).items())
        raise DataError(
            f"The model's {'output ' + repr(output) if output else 'first output'} has shape {tuple(out.shape)}; "
            f"a classifier output N×classes is needed (the model's outputs: {shapes}).",
            hint="Name the output that holds the class logits with --output (config output), or compress a "
                 "classification model.",
            code="output_not_logits",
        )
    num_classes = int(out.shape[1])
    if data.y is not None and int(data.y.max()) >= num_classes:
        raise DataError(
            f"Labels go up to {int(data.y.max())} but the model has {num_classes} classes.",
            hint=f"Use class ids 0..{num_classes - 1}, or drop y to compress without labels.",
            code="labels_out_of_range",
        )
    return num_classes


def _integer_ids(sample: Inputs) -> Callable[[nn.Module, tuple], None]:
    """A pre-hook for embeddings: float values looked up as ids are token ids stored as floats."""

    def hook(_m: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            floats = [s.name for s in sample.signature if s.dtype.is_floating_point]
            raise DataError(
                f"The model looks up {', '.join(floats) or 'an input'} in an embedding, but the data holds "
                f"floats ({', '.join(s.dtype_name for s in sample.signature if s.name in floats)}).",
                hint="Store token ids as integers (int64).", code="float_token_ids")

    return hook
