"""Fashion-MNIST benchmark: IDAP++ against torch-pruning's filter criteria (l2, taylor, fpgm, lamp, bn_scale, random).

Every method compresses the same trained ResNet-style model with the same options
(schedule, per-step and final recovery iterations, seed, data); only the criterion and
the stages differ. Accuracy is measured here on the full 10k test split (or, with `--split validation`, on
5k samples of the train split that neither the reference nor compress sees, for choosing IDAP++'s
parameters with `--idap-option`); size, wall time and
ONNX Runtime latency come from the `compress` report, and latency is timed once more after
all runs with the models interleaved (see `interleaved_latency`). With several `--seeds` (compress's
seed; the reference model and the data subset stay fixed), a summary gives each method's mean ± std
per level and IDAP++'s paired difference to the best baseline with a 95 % t-interval over the seeds.

    .venv/bin/python -m benchmarks.fashion_mnist            # full run (tens of minutes on 2 cores)
    .venv/bin/python -m benchmarks.fashion_mnist --quick    # smoke test (~1-2 minutes)
    .venv/bin/python -m benchmarks.fashion_mnist --levels 0.7 --seeds 0,1,2   # one level, every method, 3 seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F
from torchvision.models.mobilenetv2 import InvertedResidual

from benchmarks.cli_types import floats, ints, method_list, option_override
from core.data import Dataset
from core.errors import OptionsError
from core.examples import BasicBlock
from core.export.artifacts import export_onnx
from core.inputs import Inputs
from core.measure.latency import ort_latency_ms
from core.options import CompressOptions, Target
from core.progress import ProgressEvent, ProgressFn
from core.report import Report
from core.run.pipeline import compress
from core.run.preflight import preflight

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
HERE = Path(__file__).resolve().parent
CACHE_DIR = HERE / "cache"
RESULTS_PATH = HERE / "results" / "fashion_mnist.json"
EXIT_MISSING_DATA = 2

# Fashion-MNIST training-set pixel statistics (of x/255).
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530

# name -> (criterion, stages, label). Baselines are filter-pruning criteria, so they run Stage 1 only.
METHODS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "idap": ("divergence", ("filters", "layers"), "IDAP++"),
    "idap_stage1": ("divergence", ("filters",), "IDAP++ stage 1 only"),
    "l2": ("l2", ("filters",), "torch-pruning l2"),
    "taylor": ("taylor", ("filters",), "torch-pruning taylor"),
    "fpgm": ("fpgm", ("filters",), "torch-pruning fpgm"),
    "lamp": ("lamp", ("filters",), "torch-pruning lamp"),
    "bn_scale": ("bn_scale", ("filters",), "torch-pruning bn_scale"),
    "random": ("random", ("filters",), "torch-pruning random"),
}
BASELINES = ("l2", "taylor", "fpgm", "lamp", "bn_scale", "random")
IDAP = ("idap", "idap_stage1")
# Runs compare at equal MACs when each lands within this of the level (compress itself stops within
# core.run.goals.TARGET_TOLERANCE, 3 points, of it)
EQUAL_MACS = 0.01


# --------------------------------------------------------------------------- data

def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic (dtype code, ndim), dims, then raw bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


VALIDATION_SAMPLES = 5000


class Split(StrEnum):
    """Where the runs' top-1 is measured."""

    TEST = "test"
    VALIDATION = "validation"


@dataclass
class Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def training(self, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of the train split the reference is trained on and compress draws its data from."""
        return self.x_train[: config.train_samples], self.y_train[: config.train_samples]

    def validation(self, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        end = config.train_samples + VALIDATION_SAMPLES
        return self.x_train[config.train_samples: end], self.y_train[config.train_samples: end]

    def evaluation(self, split: Split, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x_test, self.y_test) if split == Split.TEST else self.validation(config)


def _images(path: Path) -> torch.Tensor:
    pixels = _read_idx(path).astype(np.float32) / 255.0
    return torch.from_numpy((pixels - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)  # N×1×28×28


def load_fashion_mnist(data_dir: Path = DATA_DIR) -> Splits:
    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(data_dir / name).astype(np.int64))

    return Splits(
        x_train=_images(data_dir / "train-images-idx3-ubyte.gz"),
        y_train=labels("train-labels-idx1-ubyte.gz"),
        x_test=_images(data_dir / "t10k-images-idx3-ubyte.gz"),
        y_test=labels("t10k-labels-idx1-ubyte.gz"),
    )


def require_data(data_dir: Path) -> None:
    if not (data_dir / "train-images-idx3-ubyte.gz").is_file():
        print(f"error: Fashion-MNIST not found in {data_dir}; install it with "
              "`apt-get install dataset-fashion-mnist`.", file=sys.stderr)
        raise SystemExit(EXIT_MISSING_DATA)


# --------------------------------------------------------------------------- model

def _stem(width: int, stride: int, activation: type[nn.ReLU] | type[nn.ReLU6]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                         activation(inplace=True))


def _stages(widths: Sequence[int], block: Callable[[int, int, int], nn.Module]) -> list[nn.Sequential]:
    """A stage of two blocks (in channels, out channels, stride) per width, stages 2 and 3 starting strided."""
    stages, channels = [], widths[0]
    for index, width in enumerate(widths):
        stages.append(nn.Sequential(block(channels, width, 1 if index == 0 else 2), block(width, width, 1)))
        channels = width
    return stages


class FashionResNet(nn.Module):
    """Stem conv, three stages of two BasicBlocks (stages 2 and 3 start strided), pool, linear."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), stem_stride: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _stem(widths[0], stem_stride, nn.ReLU)
        self.layer1, self.layer2, self.layer3 = _stages(widths, BasicBlock)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class FashionMobileNet(nn.Module):
    """The larger proxy, with depthwise convolutions: a MobileNetV2-style network at full 28×28
    resolution (stem conv, three stages of two inverted residuals with expansion 6, the first of
    stages 2 and 3 strided; a 1×1 head conv, pool, linear): 63 M MACs at the default widths, where the
    ResNet proxy has 5.6 M and its batch-1 latency is per-operator overhead."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), stem_stride: int = 1, head: int = 256,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _stem(widths[0], stem_stride, nn.ReLU6)
        self.layer1, self.layer2, self.layer3 = _stages(
            widths, lambda inp, oup, stride: InvertedResidual(inp, oup, stride, expand_ratio=6))
        self.head = nn.Sequential(nn.Conv2d(widths[-1], head, 1, bias=False), nn.BatchNorm2d(head),
                                  nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Proxy(StrEnum):
    """The model a benchmark compresses (`--proxy`)."""

    RESNET = "resnet"
    MOBILENET = "mobilenet"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the reference weights; its hash names the cache file."""

    proxy: Proxy = Proxy.RESNET
    widths: tuple[int, ...] = (16, 32, 64)
    # A strided stem: full-resolution 28×28 stages cost ~4x the time per epoch on CPU for ~no accuracy.
    stem_stride: int = 2
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # The first samples of the train split; the next VALIDATION_SAMPLES are the validation split, which
    # neither the reference nor compress ever sees: IDAP++'s free parameters are chosen on it, never on
    # the test split (issue 21).
    train_samples: int = 55_000
    version: int = 1  # bump when the model or training code changes meaning

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if self.proxy == Proxy.RESNET:
            del fields["proxy"]  # the ResNet's key predates the field: its cached weights stay valid
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def model(self) -> nn.Module:
        if self.proxy == Proxy.MOBILENET:
            return FashionMobileNet(self.widths, self.stem_stride)
        return FashionResNet(self.widths, self.stem_stride)


# The larger proxy's training: full-resolution stages, 11x the ResNet's MACs per sample.
MOBILENET_TRAIN = TrainConfig(proxy=Proxy.MOBILENET, widths=(32, 64, 128), stem_stride=1)


def fit(config: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The reference trained on `x`, `y` (Splits.training: the samples it may see)."""
    # fork_rng: the seed fixes initialisation without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = config.model()
    order_rng = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * -(-len(x) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    model.train()
    for epoch in range(config.epochs):
        started = time.monotonic()
        for index in torch.randperm(len(x), generator=order_rng).split(config.batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        seconds = time.monotonic() - started
        log(f"  epoch {epoch + 1}/{config.epochs}: loss {float(loss.detach()):.3f}, {seconds:.0f} s")
    return model.eval()


def reference_model(config: TrainConfig, data: Splits,
                    cache_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained reference model, from the cache when its config was trained before."""
    path = cache_dir / f"fashion_{config.proxy}_{config.key()}.pt"
    model = config.model()
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        log(f"Reference model from cache {path.name}")
        return model.eval(), {"cache": str(path), "cached": True, "train_seconds": saved["train_seconds"]}
    log(f"Training the reference model ({config})")
    started = time.monotonic()
    model = fit(config, *data.training(config))
    seconds = round(time.monotonic() - started, 1)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a truncated cache entry behind.
    scratch = path.with_suffix(".tmp")
    # the proxy as its name: the cache is read with weights_only=True, which refuses pickled enums
    torch.save({"state_dict": model.state_dict(), "config": {**dataclasses.asdict(config), "proxy": config.proxy.value},
                "train_seconds": seconds}, scratch)
    scratch.replace(path)
    return model, {"cache": str(path), "cached": False, "train_seconds": seconds}


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i: i + batch_size]).argmax(1) == y[i: i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


# --------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class Settings:
    """What every compression run shares; the method is the only thing that varies."""

    levels: tuple[float, ...] = (0.5, 0.7)
    methods: tuple[str, ...] = tuple(METHODS)
    # 24k rather than 12k: the final recovery then makes ~4 passes over its recovery split, not ~8.
    train_samples: int = 24_000
    test_samples: int | None = None  # None = the whole evaluation split (10k test, 5k validation)
    split: Split = Split.TEST
    recovery_iterations: int = 100
    final_recovery_iterations: int = 1200
    # Off (1.0): the held-out split comes from the train split the reference was trained on, so its
    # top-1 starts ~2.4 points above test and a 0.05 budget stopped random@50% at -18% MACs.
    # Runs must be compared at equal MACs, so the budget must never bind; the drop is still reported.
    max_accuracy_drop: float = 1.0
    calibration_samples: int = 512
    latency_runs: int = 50
    # the interleaved re-measurement (see interleaved_latency): rounds × runs per model and batch
    latency_rounds: int = 7
    latency_round_runs: int = 20
    p0: float = 0.1
    alpha: float = 1.5
    max_steps: int = 20
    round_to: int | None = 8  # compress's default
    seed: int = 0  # the data subset's
    compress_seeds: tuple[int, ...] = (0,)
    threads: int = 1
    train: TrainConfig = TrainConfig()
    # the preflight's estimate for IDAP++'s runs, to hold their wall time against (it costs a third of a run)
    estimate: bool = True
    # CompressOptions fields set for IDAP++'s runs only (its free parameters, for a sweep on the validation split)
    idap_options: tuple[tuple[str, Any], ...] = ()


QUICK: dict[str, Any] = {
    "train_samples": 600, "test_samples": 1000, "recovery_iterations": 2, "final_recovery_iterations": 4,
    "calibration_samples": 128, "latency_runs": 5, "latency_rounds": 2, "latency_round_runs": 3,
}
QUICK_TRAINING: dict[str, Any] = {"epochs": 1, "train_samples": 6000}


def options_for(method: str, settings: Settings, seed: int) -> CompressOptions:
    criterion, stages, _ = METHODS[method]
    options = CompressOptions(
        stages=stages, criterion=criterion, device="cpu", seed=seed,
        p0=settings.p0, alpha=settings.alpha, max_steps=settings.max_steps, round_to=settings.round_to,
        recovery_iterations=settings.recovery_iterations,
        final_recovery_iterations=settings.final_recovery_iterations,
        calibration_samples=settings.calibration_samples, latency_runs=settings.latency_runs,
    )
    return dataclasses.replace(options, **dict(settings.idap_options)) if method in IDAP else options


def compression_data(data: Splits, settings: Settings) -> Dataset:
    """A fixed random subset of the reference's training data (compress holds out eval_fraction of it itself)."""
    x, y = data.training(settings.train)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(settings.seed))
    index = order[: settings.train_samples]
    return Dataset(Inputs.single(x[index].contiguous()), y[index].contiguous())


def progress_logger(prefix: str) -> ProgressFn:
    """Logs a run's step and end messages, prefixed with the run's name."""
    def show(event: ProgressEvent) -> None:
        if event.stage in ("filters", "layers", "done"):
            log(f"  {prefix} {event.message}")

    return show


def reduction(before: float, after: float) -> float:
    return 1.0 - after / before if before else 0.0


def row_from_report(method: str, level: float, seed: int, report: Report, settings: Settings,
                    top1_before: float, top1_after: float) -> dict[str, Any]:
    lat_before, lat_after = report.latency_ms_before, report.latency_ms_after
    return {
        "method": method, "label": METHODS[method][2], "level": level, "seed": seed,
        "criterion": METHODS[method][0], "stages": list(METHODS[method][1]),
        "split": settings.split.value, "top1_before": top1_before, "top1_after": top1_after,
        "drop_points": round(100 * (top1_before - top1_after), 3),
        "val_top1_before": report.accuracy_before, "val_top1_after": report.accuracy_after,
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "macs_reduction": report.macs_reduction,
        "params_before": report.params_before, "params_after": report.params_after,
        "params_reduction": report.params_reduction,
        "latency_ms_before": lat_before, "latency_ms_after": lat_after,
        "latency_reduction": {k: round(reduction(lat_before[k], lat_after[k]), 4) for k in lat_before},
        "removed_blocks": report.removed_blocks,
        "steps": len(report.steps),
        # every recorded step (accepted or rolled back) was recovered; the final recovery comes on top
        "recovery_iterations_total": len(report.steps) * settings.recovery_iterations
        + settings.final_recovery_iterations,
        "stop_reason": report.stop_reason.value, "target_met": report.target_met,
        "wall_s": report.seconds, "error": None,
    }


def run_name(method: str, level: float, seed: int) -> str:
    return f"{method}@{level:g}#{seed}"


def run_one(model: nn.Module, method: str, level: float, seed: int, settings: Settings, data: Dataset,
            test: tuple[torch.Tensor, torch.Tensor], top1_before: float, out_root: Path) -> dict[str, Any]:
    """One compression; a crash inside core becomes a row with its traceback so the others still run."""
    name = run_name(method, level, seed)
    log(f"{name}: compressing")
    target = Target(macs_reduction=level, max_accuracy_drop=settings.max_accuracy_drop)
    options = options_for(method, settings, seed)
    try:
        # what the service's preflight would have promised for this run, to hold the run's wall time against
        # (IDAP++'s runs only: a preflight costs about a third of a run here)
        estimate = preflight(model, data, target, options).estimate_seconds \
            if method in IDAP and settings.estimate else None
        result = compress(model, data, target, options, out_root / f"{method}_{level:g}_{seed}",
                          progress=progress_logger(name))
    except Exception:
        trace = traceback.format_exc()
        log(f"{name}: FAILED\n{trace}")
        return {"method": method, "label": METHODS[method][2], "level": level, "seed": seed, "error": trace}
    row = row_from_report(method, level, seed, result.report, settings, top1_before, top1(result.model, *test))
    row["onnx"] = str(result.artifacts["model.onnx"])
    if estimate is not None:
        row["estimate_s"] = estimate.cpu if estimate.measured_on == "cpu" else estimate.gpu
        row["estimate_range_s"] = [estimate.low_s, estimate.high_s]
    log(f"{name}: {settings.split} top-1 {row['top1_after']:.4f} (drop {row['drop_points']:.2f} pts), "
        f"MACs -{row['macs_reduction']:.1%}, {row['wall_s']:.0f} s")
    return row


def interleaved_latency(paths: dict[str, Path], sample: Inputs, rounds: int,
                        runs: int) -> dict[str, dict[str, float]]:
    """ORT latency per ONNX file: the minimum over rounds of each round's median, models alternating.

    The report times "before" and "after" minutes apart, and on a shared machine the CPU left to
    us changes in between (the same original model measured 4.4-17.9 ms at batch 32 across runs).
    Alternating the models within a round exposes them to the same load, and contention only
    adds time, so the least disturbed round is the closest to each model's own cost.
    """
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, path in paths.items():
            timings = ort_latency_ms(path, sample, (1, 32), runs)
            kept = best.setdefault(name, timings)
            for batch, ms in timings.items():
                kept[batch] = min(kept[batch], ms)
    return best


def add_interleaved_latency(rows: list[dict[str, Any]], model: nn.Module, sample: torch.Tensor,
                            out_root: Path, settings: Settings) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    original = out_root / "original.onnx"
    export_onnx(model, Inputs.single(sample), original)
    paths = {"original": original} | {run_name(r["method"], r["level"], r["seed"]): Path(r["onnx"]) for r in _ok(rows)}
    log(f"Re-measuring ORT latency of {len(paths)} models in {settings.latency_rounds} interleaved rounds")
    latency = interleaved_latency(paths, Inputs.single(sample), settings.latency_rounds, settings.latency_round_runs)
    before = latency["original"]
    for row in _ok(rows):
        after = latency[run_name(row["method"], row["level"], row["seed"])]
        row["latency_ms_interleaved_before"], row["latency_ms_interleaved_after"] = before, after
        row["latency_reduction_interleaved"] = {k: round(reduction(before[k], after[k]), 4) for k in before}


# --------------------------------------------------------------------------- output

def _ms(row: dict[str, Any], batch: str, source: str = "") -> str:
    # shown as a signed change, so a slower pruned model reads +x% rather than a negative reduction
    before, after = row[f"latency_ms{source}_before"][batch], row[f"latency_ms{source}_after"][batch]
    return f"{before:.2f} → {after:.2f} ({-row[f'latency_reduction{source}'][batch]:+.0%})"


def _estimate(row: dict[str, Any]) -> str:
    if "estimate_s" not in row:
        return "–"
    return f"{row['estimate_s']:.0f} ({row['wall_s'] / row['estimate_s']:.2f})"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ["Method", "Level", "Seed", "Top-1 before", "Top-1 after", "Drop (pts)", "Held-out drop", "MACs after",
              "MACs red.", "Params after", "ORT b1 ms (change)", "ORT b32 ms (change)",
              "ORT b1 ms interleaved", "ORT b32 ms interleaved", "Removed blocks",
              "Steps", "Recovery its", "Stop", "Wall s", "Estimate s (wall / est.)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.get("error"):
            cells = [row["label"], f"{row['level']:.0%}", str(row["seed"]),
                     "error: " + row["error"].strip().splitlines()[-1]]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [
                row["label"], f"{row['level']:.0%}", str(row["seed"]), f"{row['top1_before']:.2%}",
                f"{row['top1_after']:.2%}", f"{row['drop_points']:.2f}",
                f"{100 * (row['val_top1_before'] - row['val_top1_after']):.2f}",
                f"{row['macs_after'] / 1e6:.2f} M", f"{row['macs_reduction']:.1%}",
                f"{row['params_after'] / 1e3:.1f} k", _ms(row, "batch_1"), _ms(row, "batch_32"),
                _ms(row, "batch_1", "_interleaved"), _ms(row, "batch_32", "_interleaved"),
                ", ".join(row["removed_blocks"]) or "–", str(row["steps"]),
                str(row["recovery_iterations_total"]),
                row["stop_reason"] + ("" if row["target_met"] else " (target missed)"),
                f"{row['wall_s']:.0f}", _estimate(row),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error")]


def method_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level and method, over its seeds: test top-1 mean and std (points), MACs reduction mean, and
    whether every run landed within EQUAL_MACS of the level."""
    out = []
    for level, method in dict.fromkeys((r["level"], r["method"]) for r in _ok(rows)):
        runs = [r for r in _ok(rows) if (r["level"], r["method"]) == (level, method)]
        top1s = np.array([100 * r["top1_after"] for r in runs])
        out.append({"level": level, "method": method, "label": METHODS[method][2], "seeds": [r["seed"] for r in runs],
                    "top1_mean": float(top1s.mean()), "top1_std": float(top1s.std(ddof=1)) if len(runs) > 1 else 0.0,
                    "macs_reduction_mean": float(np.mean([r["macs_reduction"] for r in runs])),
                    "equal_macs": all(abs(r["macs_reduction"] - level) <= EQUAL_MACS for r in runs)})
    return out


def paired_difference(rows: list[dict[str, Any]], level: float) -> dict[str, Any] | None:
    """IDAP++ against the best baseline at `level` (the highest mean test top-1), seed by seed: the mean
    difference in points and its 95 % t-interval (None with one seed)."""
    summaries = [m for m in method_summary(rows) if m["level"] == level]
    baselines = [m for m in summaries if m["method"] in BASELINES]
    if not baselines or not any(m["method"] == "idap" for m in summaries):
        return None
    best = max(baselines, key=lambda m: m["top1_mean"])
    by_seed = {(r["method"], r["seed"]): 100 * r["top1_after"] for r in _ok(rows) if r["level"] == level}
    seeds = [seed for seed in best["seeds"] if ("idap", seed) in by_seed]
    diffs = np.array([by_seed[("idap", seed)] - by_seed[(best["method"], seed)] for seed in seeds])
    mean = float(diffs.mean())
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))) \
        if len(diffs) > 1 else None
    return {"level": level, "best_baseline": best["method"], "seeds": seeds, "mean_points": mean,
            "interval": None if half is None else [mean - half, mean + half]}


def goals(rows: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """The acceptance goals (issue 21's for accuracy); `holds` is None where the runs needed for a verdict
    are missing. Latency and wall-time goals read the first seed's runs."""
    ok = _ok(rows)
    first = settings.compress_seeds[0]
    find = {(r["method"], r["level"]): r for r in ok if r["seed"] == first}
    verdicts = []

    def add(goal: str, holds: bool | None, detail: str) -> None:
        verdicts.append({"goal": goal, "holds": holds, "detail": detail})

    for level in settings.levels:
        paired = paired_difference(rows, level)
        ahead = level >= 0.7
        goal = (f"(a) IDAP++ ahead of the best baseline by ≥ 0.3 pt at {level:.0%}, paired 95 % interval above 0"
                if ahead else f"(a) IDAP++ not behind the best baseline at {level:.0%}")
        if paired is None:
            add(goal, None, "runs missing")
            continue
        interval = paired["interval"]
        shown = "one seed" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"
        holds = paired["mean_points"] >= 0.3 and interval is not None and interval[0] > 0 if ahead \
            else paired["mean_points"] >= 0
        add(goal, holds, f"{paired['mean_points']:+.2f} pt against {METHODS[paired['best_baseline']][2]} "
                         f"over seeds {paired['seeds']}, 95 % interval {shown}")
    half = find.get(("idap", 0.5))
    add("(b) IDAP++ drop ≤ 1.0 pt at 50%", None if half is None else half["drop_points"] <= 1.0,
        "run missing" if half is None else f"{half['drop_points']:.2f} pts")
    for level in settings.levels:
        for source, key in (("report", "latency_reduction"), ("interleaved", "latency_reduction_interleaved")):
            goal = f"(c) ORT latency red. ≥ 0.7 × MACs red. at {level:.0%} [{source}]"
            idap = find.get(("idap", level))
            if idap is None or key not in idap:
                add(goal, None, "run missing")
                continue
            need, got = 0.7 * idap["macs_reduction"], idap[key]
            add(goal, all(v >= need for v in got.values()),
                f"need ≥ {need:.1%}; " + ", ".join(f"{k} {v:.1%}" for k, v in got.items()))
    add("(d) IDAP++ 50% run < 600 s wall", None if half is None else half["wall_s"] < 600,
        "run missing" if half is None else f"{half['wall_s']:.0f} s")
    return verdicts


def summary_table(rows: list[dict[str, Any]], levels: Sequence[float]) -> str:
    lines = ["| Level | Method | Seeds | Top-1 (mean ± std) | MACs red. (mean) | Within ±1 pt of the level |",
             "|---|---|---|---|---|---|"]
    for m in method_summary(rows):
        lines.append(f"| {m['level']:.0%} | {m['label']} | {len(m['seeds'])} | {m['top1_mean']:.2f} ± "
                     f"{m['top1_std']:.2f} | {m['macs_reduction_mean']:.1%} | {'yes' if m['equal_macs'] else 'no'} |")
    lines += ["", "| Level | Best baseline | IDAP++ − best (pt, paired mean) | 95 % interval |", "|---|---|---|---|"]
    for level in levels:
        paired = paired_difference(rows, level)
        if paired is not None:
            interval = paired["interval"]
            lines.append(f"| {level:.0%} | {METHODS[paired['best_baseline']][2]} | {paired['mean_points']:+.2f} | "
                         + ("one seed" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]") + " |")
    return "\n".join(lines)


def format_goals(verdicts: list[dict[str, Any]]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "n/a "}
    return "\n".join(f"- {mark[v['holds']]} {v['goal']}: {v['detail']}" for v in verdicts)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(threads: int) -> dict[str, Any]:
    # distribution versions: torch_pruning 1.6.1 reports __version__ "1.6.0"
    from importlib.metadata import version

    # core/ changes under the benchmark's feet while others work on it; record what was measured
    dirty = _git("status", "--porcelain", "--", "core")
    return {
        "git_commit": _git("rev-parse", "HEAD"), "core_uncommitted_changes": None if dirty is None else bool(dirty),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_pruning": version("torch-pruning"), "onnxruntime": version("onnxruntime"),
        "cpu_count": os.cpu_count(), "torch_threads": threads, "load_average_at_start": os.getloadavg(),
    }


def log(message: str) -> None:
    # Progress goes to stderr so stdout holds only the table and the verdicts.
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fashion_mnist", description=__doc__.split("\n")[0])
    p.add_argument("--levels", type=floats, help="MACs reductions, comma-separated (default: 0.5,0.7)")
    p.add_argument("--methods", type=method_list(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--train-samples", type=int,
                   help="train-split samples passed to compress (default: 24000)")
    p.add_argument("--test-samples", type=int, help="samples of the evaluation split to use (default: all)")
    p.add_argument("--split", type=Split, choices=list(Split),
                   help="where top-1 is measured: test (default) or the validation split, for choosing parameters")
    p.add_argument("--idap-option", action="append", type=option_override, default=[], metavar="KEY=VALUE",
                   help="a CompressOptions field for IDAP++'s runs only, e.g. filter_share=1.0 (repeatable)")
    p.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="skip the preflight's time estimate of IDAP++'s runs (a third of a run each)")
    p.add_argument("--recovery-iterations", type=int, help="recovery iterations per step (default: 100)")
    p.add_argument("--final-recovery-iterations", type=int, help="final recovery iterations (default: 1200)")
    p.add_argument("--max-accuracy-drop", type=float, help="compress's accuracy budget (default: 1.0 = off)")
    p.add_argument("--seed", type=int, help="seed of the data subset (default: 0)")
    p.add_argument("--seeds", type=ints, help="compress's seeds, one run per method, level and seed (default: 0)")
    p.add_argument("--round-to", type=int,
                   help="channel counts kept to multiples of this (default: compress's 8; 1 lands closer to the level)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: 1; on a shared machine more threads run far slower)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (~1-2 minutes)")
    p.add_argument("--proxy", type=Proxy, choices=list(Proxy), default=Proxy.RESNET,
                   help="the model: the 5.6 M-MACs ResNet (default) or the 63 M-MACs MobileNetV2-style network")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR,
                   help="directory with the Fashion-MNIST .gz files")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                   help="where trained reference weights are kept")
    p.add_argument("--out", type=Path, default=RESULTS_PATH, help="JSON results file")
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="run nothing: the summary and goals of these results files' runs together "
                        "(runs split over processes, e.g. one per level or per group of methods)")
    return p


def refuse_repeats(runs: Sequence[tuple[Any, ...]]) -> None:
    """Raise ValueError when a run (its identifying key) is found more than once among combined files: a
    summary would count it twice."""
    twice = sorted({run for run in runs if runs.count(run) > 1})
    if twice:
        raise ValueError(f"runs found in more than one file: {twice}")


def combined_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The rows of several results files; a run (method, level, seed) found twice is refused, since the
    summary would count it twice."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += json.loads(path.read_text())["rows"]
    refuse_repeats([(r["method"], r["level"], r["seed"]) for r in rows])
    splits = {r.get("split", Split.TEST.value) for r in rows}
    if len(splits) > 1:
        raise ValueError(f"rows measured on different splits ({', '.join(sorted(splits))}) cannot be compared")
    return rows


def print_combined(paths: Sequence[Path]) -> None:
    rows = combined_rows(paths)
    levels = tuple(sorted({r["level"] for r in rows}))
    settings = Settings(levels=levels, compress_seeds=tuple(sorted({r["seed"] for r in rows})))
    print(summary_table(rows, levels))
    print("\nGoals:")
    print(format_goals(goals(rows, settings)))


def settings_from(args: argparse.Namespace) -> Settings:
    """Defaults, then --quick's tiny values, then whatever was given explicitly."""
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    train = MOBILENET_TRAIN if args.proxy == Proxy.MOBILENET else TrainConfig()
    values["train"] = dataclasses.replace(train, **QUICK_TRAINING) if args.quick else train
    explicit = {"levels": args.levels, "methods": args.methods, "train_samples": args.train_samples,
                "test_samples": args.test_samples, "recovery_iterations": args.recovery_iterations,
                "final_recovery_iterations": args.final_recovery_iterations,
                "max_accuracy_drop": args.max_accuracy_drop, "seed": args.seed, "threads": args.threads,
                "compress_seeds": args.seeds, "round_to": args.round_to, "split": args.split}
    values.update({k: v for k, v in explicit.items() if v is not None})
    values["idap_options"] = tuple(args.idap_option)
    values["estimate"] = args.estimate
    return Settings(**values)


def run(settings: Settings, data_dir: Path, cache_dir: Path, out: Path) -> dict[str, Any]:
    """All runs; each run's model.onnx / model.pt2 / report.json are kept next to `out`."""
    torch.set_num_threads(settings.threads)
    env = environment(settings.threads)  # at the start: the code that gets imported and the load now
    data = load_fashion_mnist(data_dir)
    x_eval, y_eval = data.evaluation(settings.split, settings.train)
    x_eval, y_eval = x_eval[: settings.test_samples], y_eval[: settings.test_samples]
    model, trained = reference_model(settings.train, data, cache_dir)
    before = top1(model, x_eval, y_eval)
    log(f"Reference {settings.split} top-1 {before:.4f} on {len(x_eval)} samples")
    subset = compression_data(data, settings)
    runs_dir = out.parent / f"{out.stem}_runs"
    rows = [run_one(model, method, level, seed, settings, subset, (x_eval, y_eval), before, runs_dir)
            for level in settings.levels for seed in settings.compress_seeds for method in settings.methods]
    add_interleaved_latency(rows, model, x_eval[:1], runs_dir, settings)
    result = {
        "settings": dataclasses.asdict(settings),
        "reference": {"split": settings.split.value, "top1": before, "samples": len(x_eval), **trained},
        "environment": env,
        "rows": rows,
        "summary": method_summary(rows),
        "paired": [p for p in (paired_difference(rows, level) for level in settings.levels) if p is not None],
        "goals": goals(rows, settings),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.combine:
        try:
            print_combined(args.combine)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--combine: {error}")
        return 0
    require_data(args.data_dir)
    settings = settings_from(args)
    try:
        dataclasses.replace(CompressOptions(), **dict(settings.idap_options)).validate()
    except (TypeError, OptionsError) as error:
        parser.error(f"--idap-option: {error}")
    result = run(settings, args.data_dir, args.cache_dir, args.out)
    reference = result["reference"]
    print(f"Fashion-MNIST, reference {reference['split']} top-1 {reference['top1']:.2%} "
          f"on {reference['samples']} {reference['split']} samples; "
          "MACs are multiply-accumulates per sample.\n")
    print(markdown_table(result["rows"]))
    print("\n" + summary_table(result["rows"], settings.levels))
    print("\nGoals:")
    print(format_goals(result["goals"]))
    print(f"\nJSON: {args.out}")
    return 1 if any(r.get("error") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
