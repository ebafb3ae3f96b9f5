"""Inference latency of an exported model in ONNX Runtime, on its CPU, CUDA or TensorRT execution provider."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from core.export.spec import ort_feed
from core.inputs import Inputs


class Provider(StrEnum):
    """The ONNX Runtime execution providers latency is measured on."""

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"

    @property
    def ort_name(self) -> str:
        return _ORT_NAMES[self]


_ORT_NAMES = {Provider.CPU: "CPUExecutionProvider", Provider.CUDA: "CUDAExecutionProvider",
              Provider.TENSORRT: "TensorrtExecutionProvider"}
# What runs the nodes a provider cannot: TensorRT hands them to CUDA, CUDA to the CPU.
_FALLBACKS = {Provider.CPU: (), Provider.CUDA: (Provider.CPU,), Provider.TENSORRT: (Provider.CUDA, Provider.CPU)}

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Session:
    """An ONNX Runtime session, the provider it runs on, and why that is not the one asked for (None: it is)."""

    session: Any  # onnxruntime.InferenceSession
    provider: Provider
    note: str | None = None


def available_providers() -> list[Provider]:
    """The providers the installed onnxruntime offers (a CPU-only wheel: the CPU alone)."""
    import onnxruntime as ort

    offered = set(ort.get_available_providers())
    return [provider for provider in Provider if provider.ort_name in offered]


def open_session(onnx_path: Path, provider: Provider = Provider.CPU) -> Session:
    """A session of `onnx_path` on `provider`, or on the CPU with a note saying why not.

    The CPU is single-threaded: on a shared machine, thread-pool contention makes multi-threaded timings of
    small models swing by 2x between runs, hiding the effect of pruning.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if provider not in available_providers():
        offered = ", ".join(ort.get_available_providers())
        return Session(ort.InferenceSession(str(onnx_path), options, providers=[Provider.CPU.ort_name]), Provider.CPU,
                       f"{provider.ort_name} is not in this onnxruntime (it offers {offered}); measured on the CPU "
                       "(onnxruntime-gpu brings CUDA and TensorRT)")
    names = [p.ort_name for p in (provider, *_FALLBACKS[provider])]
    session = ort.InferenceSession(str(onnx_path), options, providers=names)
    # onnxruntime falls back to the CPU on its own when a provider's libraries (CUDA, cuDNN, TensorRT) fail to load
    if session.get_providers()[0] != provider.ort_name:
        return Session(session, Provider.CPU, f"{provider.ort_name} could not start (its libraries are missing or do "
                                              "not match); measured on the CPU")
    return Session(session, provider)


def median_ms(session: Any, feed: Feed, runs: int) -> float:
    """Median wall-clock milliseconds of `runs` runs on `feed` after a warm-up run (a TensorRT engine is built
    there), inputs and outputs in host memory as a caller hands them over."""
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 4)


def batched(first: Feed, batch: int) -> Feed:
    """`first` (one sample per input) repeated to `batch` samples."""
    return {name: np.repeat(array, batch, axis=0) for name, array in first.items()}


def ort_latency_ms(onnx_path: Path, sample: Inputs, batches: tuple[int, ...], runs: int) -> dict[str, float]:
    """Median ONNX Runtime CPU latency per batch size (the report's), after a warm-up run; the GPU providers'
    numbers come from benchmarks/gpu_latency.py."""
    session = open_session(onnx_path).session
    first = ort_feed(session.get_inputs(), sample[:1])
    return {f"batch_{batch}": median_ms(session, batched(first, batch), runs) for batch in batches}
