"""Size, accuracy and latency measurements shared by the stages and the report."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from core.data import Dataset


def logits_of(output: Any) -> torch.Tensor:
    """The classification logits of a model output (tensor, tuple, or an object with .logits)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}.")


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates for one sample, and the parameter count."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example[:1])
    model.train(was_training)
    return int(macs), int(params)


@torch.no_grad()
def all_logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([logits_of(model(x[i : i + batch_size].to(device))).float().cpu()
                      for i in range(0, len(x), batch_size)])


def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    return all_logits(model, x, device, batch_size).argmax(1)


def drift(model: nn.Module, x: torch.Tensor, device: torch.device, reference: torch.Tensor) -> float:
    """Mean KL divergence of `model`'s outputs on `x` from the `reference` logits (the original
    model's): how far a pruned candidate has moved from the function it should keep. Unlike top-1
    or the loss against labels, it still separates two candidates on samples the original has
    memorised, where both are right and confident."""
    return kl_from(reference, all_logits(model, x, device))


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL divergence of the distributions `logits` give from those `reference` gives (in float64:
    a cut that barely moves the logits must still measure above zero)."""
    log_p = torch.log_softmax(reference.double(), dim=1)
    log_q = torch.log_softmax(logits.double(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def top1(model: nn.Module, data: Dataset, device: torch.device, reference: torch.Tensor | None) -> float:
    """Top-1 against the labels, or agreement with `reference` predictions when unlabeled."""
    target = data.y if data.y is not None else reference
    if target is None:
        raise ValueError("Unlabeled data needs the original model's predictions as reference.")
    return float((predict(model, data.x, device) == target).float().mean())


def ort_latency_ms(
    onnx_path: Path, sample: np.ndarray, batches: tuple[int, ...], runs: int
) -> dict[str, float]:
    """Median ONNX Runtime CPU latency per batch size, after a warm-up run.

    Single-threaded: on a shared machine, thread-pool contention makes multi-threaded
    timings of small models swing by 2x between runs, hiding the effect of pruning.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    from core.export import onnx_input_dtype

    declared = session.get_inputs()[0]
    name = declared.name
    sample = sample.astype(onnx_input_dtype(declared.type))
    result: dict[str, float] = {}
    for batch in batches:
        feed = {name: np.repeat(sample[:1], batch, axis=0)}
        session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1000.0)
        result[f"batch_{batch}"] = round(statistics.median(times), 4)
    return result
