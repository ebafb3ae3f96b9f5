"""Inference latency of an exported model in ONNX Runtime."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from core.export.spec import ort_feed
from core.inputs import Inputs


def ort_latency_ms(
    onnx_path: Path, sample: Inputs, batches: tuple[int, ...], runs: int
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
    first = ort_feed(session.get_inputs(), sample[:1])
    result: dict[str, float] = {}
    for batch in batches:
        feed = {name: np.repeat(array, batch, axis=0) for name, array in first.items()}
        session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1000.0)
        result[f"batch_{batch}"] = round(statistics.median(times), 4)
    return result
