"""`idap`: compress a model from the command line, or write the digits example.

Errors the user can fix print one line (`error: …`) and exit 2; Ctrl-C exits 130.
Results are written to a sibling temporary directory and moved into --out only when the
whole run succeeded, so --out never holds a half-written result.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from core.errors import ExportError, OptionsError, UserError
from core.intake.files import compress_files, inspect_files
from core.intake.model_io import detect_format, is_factory_spec
from core.options import CompressOptions, IntakeOptions, NormStatistics, Precision, Target, parse_stages
from core.progress import ProgressEvent
from core.report import PreflightReport, Report, to_json
from core.tasks.kinds import DetectionDecoder, Task

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """Turns usage errors into `OptionsError` so they print like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise OptionsError(f"{message}.", hint=f"See `{self.prog} --help`.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="idap", description="IDAP++ structured pruning of PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prune(commands.add_parser("prune", help="compress a model to a MACs/params target"))
    _add_inspect(commands.add_parser("inspect", help="preflight: what pruning this model can reach, without pruning"))
    example = commands.add_parser("example", help="write a small trained model and its data")
    example.add_argument("name", choices=["digits"], help="which example")
    example.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="directory for model.pt and data.npz")
    example.add_argument("--seed", type=int, default=0, metavar="N")
    for register in _plugin_commands():
        register(commands)
    return parser


def _plugin_commands() -> list[Callable[[Any], None]]:
    """`register(subparsers)` callables of installed packages (the service adds serve, db, keys).
    A registered subcommand sets `func` (args -> exit code) with `set_defaults`."""
    return [entry.load() for entry in entry_points(group="idap.commands")]


def _add_inputs(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="ONNX file, .safetensors (with --architecture), zipped Hugging Face directory, "
                        "file saved with torch.save(model, path), or package.module:factory")
    parser.add_argument("--architecture", metavar="SPEC",
                        help="architecture of .safetensors weights: torchvision:NAME(num_classes=N) or idap:digits")
    parser.add_argument("--weights", metavar="FILE",
                        help=".safetensors weights for a package.module:factory MODEL")
    parser.add_argument("--output", metavar="NAME",
                        help="the model output that holds the class logits, for a model with several (a dict key, "
                        "or output_N for a tuple's Nth); default: the first, or a ModelOutput's logits")
    parser.add_argument("--data", type=Path, required=data_required, metavar="FILE",
                        help=".npz (x, or one array per model input by name; optional y), zip of class folders "
                        "of images, or .jsonl/.csv text (text, label) for models with a tokenizer")
    intake = IntakeOptions()
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="side of image-folder images after resizing (default: the model's, else 224)")
    parser.add_argument("--text-column", default=intake.text_column, metavar="NAME", help="(default: %(default)s)")
    parser.add_argument("--label-column", default=intake.label_column, metavar="NAME", help="(default: %(default)s)")


def _add_inspect(inspect: argparse.ArgumentParser) -> None:
    _add_inputs(inspect, data_required=False)
    _add_target(inspect, required=False)
    _add_stages_and_device(inspect.add_argument_group("method"))
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_stages_and_device(group: argparse._ArgumentGroup) -> None:
    defaults = CompressOptions()
    group.add_argument("--stages", default=",".join(defaults.stages), metavar="LIST",
                       help="filters, layers or filters,layers (default: %(default)s)")
    group.add_argument("--device", default=defaults.device, metavar="NAME",
                       help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    group.add_argument("--task", default=defaults.task.value, choices=[task.value for task in Task],
                       help="what the model does, which sets the quality metric the budget applies to; auto infers "
                            "it from the outputs (default: %(default)s)")
    group.add_argument("--detection-decoder", default=defaults.detection_decoder.value,
                       choices=[decoder.value for decoder in DetectionDecoder],
                       help="how a detector's outputs become boxes: auto reads torchvision's or outputs named "
                            "boxes/scores/labels (else compares the raw outputs); yolov5/yolov8 decode an exported "
                            "raw YOLO head (default: %(default)s)")


def _add_target(parser: argparse.ArgumentParser, required: bool) -> None:
    target = parser.add_argument_group("target" + (" (at least one size target)" if required else ""))
    target.add_argument("--macs-reduction", type=float, metavar="F", help="MACs fraction to remove, e.g. 0.5")
    target.add_argument("--params-reduction", type=float, metavar="F", help="params fraction to remove")
    target.add_argument("--max-accuracy-drop", "--max-quality-drop", type=float, metavar="F",
                        help="budget on the task's quality metric on the held-out split: top-1 points for a classifier "
                             "(0.01 = one point), cosine similarity, mAP@0.5 or mIoU points, relative output error, "
                             "or the relative perplexity increase of a language model (0.1 = 10 %%); default: the "
                             "task's (0.01 for classification; README, Tasks)")


def _add_prune(prune: argparse.ArgumentParser) -> None:
    defaults = CompressOptions()
    _add_inputs(prune, data_required=True)
    prune.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="directory for model.onnx, model.pt2 and report.json")
    prune.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    _add_target(prune, required=True)
    method = prune.add_argument_group("method")
    _add_stages_and_device(method)
    method.add_argument("--seed", type=int, default=defaults.seed, metavar="N")
    method.add_argument("--recovery-epochs", type=float, metavar="F",
                        help=f"fine-tuning epochs after each step (default: {defaults.recovery_epochs})")
    method.add_argument("--recovery-iterations", type=int, metavar="N",
                        help="fine-tuning iterations after each step, instead of epochs")
    method.add_argument("--final-recovery-epochs", type=float, default=defaults.final_recovery_epochs,
                        metavar="F", help="fine-tuning epochs at the end (default: %(default)s)")
    method.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                        help="(default: %(default)s)")
    method.add_argument("--precision", default=defaults.precision.value, choices=[p.value for p in Precision],
                        help="arithmetic of recovery's forward passes: auto is bf16 autocast on CUDA devices that "
                             "support it, fp32 elsewhere (default: %(default)s)")
    method.add_argument("--norm-statistics", default=defaults.norm_statistics.value,
                        choices=[n.value for n in NormStatistics],
                        help="BatchNorm statistics in recovery: auto freezes them in a network of >= 1 M parameters "
                             "when fewer than 5,000 samples are left for recovery (default: %(default)s)")
    method.add_argument("--round-to", type=int, default=defaults.round_to, metavar="N",
                        help="keep channel counts multiples of N; 1 turns it off (default: %(default)s)")
    method.add_argument("--min-width-fraction", type=float, default=defaults.min_width_fraction, metavar="F",
                        help="never prune a layer below this fraction of its width (default: %(default)s)")
    method.add_argument("--layers-unconditional", action="store_true",
                        help="let Stage 2 remove a block even when pruning width to the same size does better")
    method.add_argument("--ignore-layer", action="append", default=[], metavar="NAME",
                        help="module name never to prune (repeatable)")
    method.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop pruning after this long")
    method.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction, metavar="F",
                        help="share of the data held out to measure accuracy, at least one batch "
                        "(default: %(default)s)")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "func", None) is not None:
            return int(args.func(args))
        if args.command == "example":
            return _run_example(args)
        if args.command == "inspect":
            return _run_inspect(args)
        return _run_prune(args)
    except UserError as err:
        _print_error(str(err))
        return EXIT_USER_ERROR
    except ExportError as err:
        _print_error(f"Export of the pruned model failed: {err}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _print_error("Interrupted; nothing was written to --out.")
        return EXIT_INTERRUPTED


def _print_error(text: str) -> None:
    # One line, whatever the message embeds, so scripts and logs can rely on it.
    print("error: " + " ".join(text.split()), file=sys.stderr)


def _run_example(args: argparse.Namespace) -> int:
    from core.examples import make_digits_example  # pulls in scikit-learn, needed only here

    model_path, data_path = make_digits_example(args.out, seed=args.seed)
    print(f"model: {model_path}\nweights: {model_path.with_suffix('.safetensors')} (architecture idap:digits)\n"
          f"data:  {data_path}")
    return 0


def _intake(args: argparse.Namespace) -> IntakeOptions:
    # Local files are the user's own: pickles are loaded (with a warning), unlike uploads to the service.
    return IntakeOptions(architecture=args.architecture, allow_pickle=True, image_size=args.image_size,
                         text_column=args.text_column, label_column=args.label_column)


def _model_spec(args: argparse.Namespace, intake: IntakeOptions) -> str:
    spec = args.model
    if is_factory_spec(spec):
        # Like `python -m`, resolve the user's own packages from the working directory.
        sys.path.insert(0, os.getcwd())
    elif Path(spec).is_file() and Path(spec).stat().st_size and detect_format(Path(spec), intake) == "pickle":
        print(f"warning: loading {spec} runs the pickled code inside it; use only files you trust.",
              file=sys.stderr)
    return spec


def _run_inspect(args: argparse.Namespace) -> int:
    target = None
    if args.macs_reduction is not None or args.params_reduction is not None:
        target = Target(args.macs_reduction, args.params_reduction, args.max_accuracy_drop)
    options = CompressOptions(stages=parse_stages(args.stages), device=args.device, task=Task(args.task),
                              detection_decoder=DetectionDecoder(args.detection_decoder), output=args.output)
    intake = _intake(args)
    weights = None if args.weights is None else Path(args.weights)
    report = inspect_files(_model_spec(args, intake), args.data, target, options, intake, weights=weights)
    print(to_json(report) if args.json else format_inspection(report))
    return 0


def _run_prune(args: argparse.Namespace) -> int:
    target, options = _target_and_options(args)
    intake = _intake(args)
    out = args.out.resolve()
    inputs = [args.data, *(Path(p) for p in (args.model, args.weights) if p and Path(p).exists())]
    _check_out_dir(out, args.force, inputs)
    spec = _model_spec(args, intake)
    weights = None if args.weights is None else Path(args.weights)
    with _staging_dir(out) as staging:
        with _ProgressBar() as bar:
            result = compress_files(spec, args.data, target, options, intake, staging, progress=bar,
                                    weights=weights)
        _publish(staging, out)
    print(format_summary(result.report))
    print("Artifacts:")
    for path in result.artifacts.values():
        print(f"  {out / Path(path).relative_to(staging)}")
    return 0


def _target_and_options(args: argparse.Namespace) -> tuple[Target, CompressOptions]:
    if args.recovery_epochs is not None and args.recovery_iterations is not None:
        raise OptionsError(
            "--recovery-epochs and --recovery-iterations both set the recovery budget.",
            hint="Pass only one of them.",
        )
    target = Target(args.macs_reduction, args.params_reduction, args.max_accuracy_drop)
    target.validate()
    defaults = CompressOptions()
    options = CompressOptions(
        stages=parse_stages(args.stages),
        device=args.device,
        task=Task(args.task),
        detection_decoder=DetectionDecoder(args.detection_decoder),
        seed=args.seed,
        min_width_fraction=args.min_width_fraction,
        round_to=args.round_to,
        ignored_layers=tuple(args.ignore_layer),
        output=args.output,
        recovery_epochs=defaults.recovery_epochs if args.recovery_epochs is None else args.recovery_epochs,
        recovery_iterations=args.recovery_iterations,
        final_recovery_epochs=args.final_recovery_epochs,
        batch_size=args.batch_size,
        precision=Precision(args.precision),
        norm_statistics=NormStatistics(args.norm_statistics),
        time_budget_s=args.time_budget,
        eval_fraction=args.eval_fraction,
        layers_must_beat_width=not args.layers_unconditional,
    )
    options.validate()
    return target, options


def _check_out_dir(out: Path, force: bool, inputs: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise OptionsError(f"--out {out} exists and is not a directory.", hint="Choose a directory path.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise OptionsError(f"--out {out} is not empty.",
                           hint="Choose another directory, or pass --force to replace it.")
    # --force deletes the old directory; never let that take the inputs or the shell's directory with it.
    for path in (Path.cwd(), *inputs):
        resolved = path.resolve()
        if resolved == out or out in resolved.parents:
            raise OptionsError(
                f"--force would delete {path}, which is inside --out {out}.",
                hint="Choose an --out that holds no inputs and is not the working directory.",
            )


@contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` (same filesystem, so publishing is a rename); always removed."""
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise OptionsError(f"Cannot write beside --out {out}: {exc.strerror or exc}.",
                           hint="Choose a directory you can write to.") from exc
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    """Move the finished result into `out`; an existing `out` (checked by the caller) is replaced."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


class _ProgressBar:
    """A tqdm bar over the whole run, fed by `ProgressEvent.fraction`, with the run's elapsed time and its
    ETA (from the steps measured so far, ProgressEvent.eta_s). On a terminal the bar updates in place;
    elsewhere (a log, a pipe) each step, warning and stage change is one line on stderr."""

    _RESOLUTION = 1000

    def __init__(self) -> None:
        self._bar = tqdm(total=self._RESOLUTION, file=sys.stderr, disable=None, dynamic_ncols=True,
                         bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")
        self._stage: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        timing = _timing(event)
        if self._bar.disable:
            if event.stage != self._stage or event.stage in ("filters", "layers") \
                    or event.message.startswith("Warning:"):
                print(f"[{timing}] {event.stage}: {event.message}", file=sys.stderr, flush=True)
            self._stage = event.stage
            return
        if event.message.startswith("Warning:"):
            self._bar.write(event.message, file=sys.stderr)
        self._bar.set_description_str(f"{event.stage}: {event.message}", refresh=False)
        self._bar.set_postfix_str(timing, refresh=False)
        self._bar.update(round(event.fraction * self._RESOLUTION) - self._bar.n)
        self._bar.refresh()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def _timing(event: ProgressEvent) -> str:
    elapsed = "" if event.elapsed_s is None else f"{_clock(event.elapsed_s)} elapsed"
    eta = "ETA after the first step" if event.eta_s is None else f"ETA {_clock(event.eta_s)}"
    return ", ".join(part for part in (elapsed, eta) if part)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_summary(report: Report) -> str:
    """The before/after table printed at the end of `idap prune`."""
    latency_before, latency_after = report.latency_ms_before, report.latency_ms_after
    before, after, metric = report.accuracy_before, report.accuracy_after, report.accuracy_metric
    rows = [
        _relative_row("MACs", report.macs_before, report.macs_after, _mega),
        _relative_row("Params", report.params_before, report.params_after, _mega),
        (metric.label[:1].upper() + metric.label[1:], metric.show(before), metric.show(after),
         metric.show_change(before, after)),
    ]
    rows += [_relative_row(f"ORT latency, batch {key.removeprefix('batch_')}", latency_before[key],
                           latency_after[key], lambda v: f"{v:.3f} ms")
             for key in latency_before]
    width = max(len(row[0]) for row in rows)
    lines = [f"{'':<{width}}  {'before':>10}  {'after':>10}  {'change':>9}"]
    lines += [f"{label:<{width}}  {before:>10}  {after:>10}  {change:>9}"
              for label, before, after, change in rows]
    removed = report.removed_blocks
    lines += [
        f"ONNX max abs diff: {report.onnx_max_abs_diff:.2e}",
        f"Removed blocks: {len(removed)}" + (f" ({', '.join(removed)})" if removed else ""),
        f"Target met: {'yes' if report.target_met else 'no'} (stop reason: {report.stop_reason})",
        f"Task: {report.task}; budget: {report.budget}",
    ]
    resolution = report.budget_resolution
    if resolution is not None:
        lines.append(f"Accuracy budget decided by {resolution.eval_samples} held-out samples "
                     f"(one is worth {resolution.sample_worth:.2%})"
                     + ("" if resolution.resolved else
                        f"; finer than they resolve: judged by soft agreement "
                        f"{report.soft_agreement_before:.4f} -> {report.soft_agreement_after:.4f} "
                        f"and top-1 within {resolution.top1_tolerance:.2%}"))
    # why the target was missed, and why model.pt2 is missing
    if not report.target_met and report.message:
        lines.append(report.message)
    if report.pt2_error:
        lines.append(f"model.pt2 was not written: {report.pt2_error}")
    return "\n".join(lines)


def _mega(value: float) -> str:
    return f"{value / 1e6:.3f} M"


def _relative_row(label: str, before: float, after: float, show: Callable[[float], str]) -> tuple[str, ...]:
    return label, show(before), show(after), f"{(after - before) / before:+.1%}"


def format_inspection(report: PreflightReport) -> str:
    """The preflight as a short table: sizes, what can be pruned, what can be reached."""
    reach = report.reachable_reduction
    estimate = report.estimate_seconds
    groups = report.prunable_groups
    lines = [
        f"Format: {report.input_format}; input {report.input_dtype} {report.input_shape}"
        + ("" if report.num_classes is None else f"; {report.num_classes} classes"),
        f"Task: {report.task}; budget: {report.budget}",
        f"MACs: {_mega(report.macs)}   Params: {_mega(report.params)}",
        f"Prunable groups: {len(groups)} ({sum(g.width for g in groups)} channels)",
    ]
    width = max((len(g.name) for g in groups), default=0)
    lines += [f"  {g.name:<{width}}  width {g.width:>5}  min {g.min_width:>4}" for g in groups]
    lines.append(f"Not prunable: {len(report.not_prunable)}")
    lines += [f"  {row.name} ({row.type}): {row.reason}" for row in report.not_prunable]
    lines.append(f"Removable blocks: {', '.join(b.name for b in report.blocks) or 'none'}")
    lines.append(f"Largest reachable reduction: MACs -{reach['macs']:.1%}, params -{reach['params']:.1%}")
    if report.feasible is not None:
        lines.append("Target: feasible" if report.feasible else "Target: NOT feasible")
    lines += [f"  {problem}" for problem in report.problems]
    measured = estimate.cpu if estimate.measured_on == "cpu" else estimate.gpu
    lines.append(f"Estimated job time: ~{estimate.cpu:.0f} s on CPU, ~{estimate.gpu:.0f} s on GPU "
                 f"(measured on {estimate.measured_on}: ~{measured:.0f} s, range {estimate.low_s:.0f}-"
                 f"{estimate.high_s:.0f} s; {estimate.steps} steps of ~{estimate.step_s:.1f} s with "
                 f"{estimate.recovery_iterations} recovery iterations each, {estimate.final_recovery_iterations} "
                 f"final)")
    resolution = report.budget_resolution
    if resolution is not None:
        lines.append(f"Accuracy budget: decided by {resolution.eval_samples} held-out samples, one worth "
                     f"{resolution.sample_worth:.2%}")
        if resolution.warning:
            lines.append(f"Warning: {resolution.warning}")
    lines += [f"Note: {note}" for note in report.notes]
    return "\n".join(lines)
