"""GPU deployment numbers: ONNX Runtime latency of an original and a pruned model.onnx at batch 1 and 32 on each
execution provider the installed onnxruntime offers (TensorRT, CUDA, CPU), original and pruned interleaved run
by run so that clock and temperature drift hit both alike. Inputs and outputs are in host memory, as a caller
hands them over, so the GPU numbers include their copies.

    .venv/bin/pip install onnxruntime-gpu   # in place of onnxruntime, on a CUDA machine (TensorRT: its libraries)
    .venv/bin/python -m benchmarks.gpu_latency original.onnx idap-out/model.onnx --out gpu_latency.json
    .venv/bin/python -m benchmarks.gpu_latency --quick      # a tiny exported model, for the smoke test

Without CUDA it says so and measures the CPU only (single-threaded, as the report does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.export.artifacts import export_onnx
from core.export.spec import onnx_input_dtype
from core.inputs import Inputs
from core.measure.latency import Feed, Provider, Session, available_providers, batched, open_session

BATCHES = (1, 32)
# The length of a symbolic axis other than the batch (a sequence of token ids) in the generated inputs.
SEQUENCE = 128


@dataclass(frozen=True)
class Row:
    provider: str
    batch: int
    original_ms: float
    pruned_ms: float

    @property
    def speedup(self) -> float:
        return round(self.original_ms / self.pruned_ms, 3) if self.pruned_ms > 0 else float("nan")


def sample_feed(session: Session) -> Feed:
    """One sample for every input the model declares: normal floats, ones for integers (a valid token id and a
    mask that keeps every position)."""
    rng = np.random.default_rng(0)
    feed: Feed = {}
    for arg in session.session.get_inputs():
        shape = [1 if i == 0 else dim if isinstance(dim, int) else SEQUENCE for i, dim in enumerate(arg.shape)]
        dtype = onnx_input_dtype(arg.type)
        feed[arg.name] = (rng.standard_normal(shape) if np.issubdtype(dtype, np.floating)
                          else np.ones(shape)).astype(dtype)
    return feed


def interleaved_ms(sessions: tuple[Session, Session], feeds: tuple[Feed, Feed], runs: int) -> tuple[float, float]:
    """Median milliseconds of the two models, run alternately after a warm-up each (TensorRT builds its engine
    there)."""
    for session, feed in zip(sessions, feeds, strict=True):
        session.session.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for session, feed, kept in zip(sessions, feeds, times, strict=True):
            start = time.perf_counter()
            session.session.run(None, feed)
            kept.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times[0]), 4), round(statistics.median(times[1]), 4)


def measure(original: Path, pruned: Path, provider: Provider, batches: tuple[int, ...],
            runs: int) -> tuple[list[Row], str | None]:
    """The rows of one provider, and the note of a fallback (then there are no rows: the CPU has its own)."""
    sessions = (open_session(original, provider), open_session(pruned, provider))
    note = sessions[0].note or sessions[1].note
    if note is not None:
        return [], note
    firsts = (sample_feed(sessions[0]), sample_feed(sessions[1]))
    rows = []
    for batch in batches:
        feeds = (batched(firsts[0], batch), batched(firsts[1], batch))
        original_ms, pruned_ms = interleaved_ms(sessions, feeds, runs)
        rows.append(Row(provider.value, batch, original_ms, pruned_ms))
    return rows, None


def table(rows: list[Row]) -> str:
    lines = [f"{'provider':<10} {'batch':>5} {'original ms':>12} {'pruned ms':>10} {'speed-up':>8}"]
    lines += [f"{r.provider:<10} {r.batch:>5} {r.original_ms:>12.3f} {r.pruned_ms:>10.3f} {r.speedup:>7.2f}x"
              for r in rows]
    return "\n".join(lines)


class _TinyNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def quick_models(directory: Path) -> tuple[Path, Path]:
    """A tiny conv net and a narrower copy of it, exported: enough to run every provider once."""
    example = Inputs.single(torch.randn(2, 3, 16, 16))
    paths = directory / "original.onnx", directory / "pruned.onnx"
    for width, path in zip((16, 8), paths, strict=True):
        export_onnx(_TinyNet(width).eval(), example, path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_latency", description=__doc__.split("\n")[0])
    p.add_argument("original", type=Path, nargs="?", help="the original model.onnx")
    p.add_argument("pruned", type=Path, nargs="?", help="the pruned model.onnx (compress's output)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model and batch (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a tiny exported model and 3 runs (smoke test)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.quick and (args.original is None or args.pruned is None):
        build_parser().error("give the original and the pruned model.onnx, or --quick")
    with tempfile.TemporaryDirectory() as scratch:
        original, pruned = quick_models(Path(scratch)) if args.quick else (args.original, args.pruned)
        runs = 3 if args.quick else args.runs
        offered = available_providers()
        if Provider.CUDA not in offered:
            print("No CUDA execution provider in this onnxruntime (install onnxruntime-gpu on a CUDA machine): "
                  "measuring the CPU only.", file=sys.stderr)
        rows: list[Row] = []
        notes: dict[str, str] = {}
        # the GPU providers first, in the order a deployment would prefer them
        for provider in (Provider.TENSORRT, Provider.CUDA, Provider.CPU):
            if provider not in offered:
                continue
            measured, note = measure(original, pruned, provider, BATCHES, runs)
            rows += measured
            if note is not None:
                notes[provider.value] = note
                print(f"{provider.value}: {note}", file=sys.stderr)
    print(table(rows))
    result = {"original": str(original), "pruned": str(pruned), "runs": runs,
              "providers": [p.value for p in offered], "notes": notes,
              "rows": [asdict(row) | {"speedup": row.speedup} for row in rows]}
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
