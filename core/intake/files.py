"""From uploaded files to a compressed model: data formats, and the two calls the CLI and the
service make (`compress_files`, `inspect_files`). Model formats live in core.intake.model_io."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from core.data import Dataset
from core.errors import DataError
from core.inputs import Inputs
from core.intake.archives import holds_only_arrays, is_zip, open_zip
from core.intake.hf import save_pretrained_zip
from core.intake.image_data import load_image_folder_zip
from core.intake.loaded import LoadedModel
from core.intake.model_io import check_input_file, open_model
from core.intake.npz import load_npz, too_many_samples
from core.intake.text_data import read_records, tokenize, windows
from core.options import CompressOptions, IntakeOptions, Target
from core.progress import CancelFn, ProgressFn
from core.report import PreflightReport
from core.run.checkpoint import Checkpoint, CheckpointFn
from core.run.pipeline import Result, prune_and_export, write_report
from core.run.preflight import preflight

_DATA_HINT = ("Upload an .npz (x, or one array per model input by name; optional y), a zip of class folders of "
              "images, or for text models a .jsonl/.csv with text and label columns.")


def open_data(path: Path, model: LoadedModel, intake: IntakeOptions) -> Dataset:
    """The calibration data in `path`, read according to its content and the model's inputs."""
    check_input_file(path, "data", intake.max_file_bytes, _DATA_HINT)
    if is_zip(path):
        data = load_npz(path, intake) if _is_npz(path) else _image_folder(path, model, intake)
    elif model.tokenizer is not None:
        records = read_records(path, intake.max_samples)
        data = windows(records, model.tokenizer, intake.text_column, intake.max_length) if model.text_windows \
            else tokenize(records, model.tokenizer, intake.text_column, intake.label_column, intake.max_length,
                          model.label_names)
    else:
        raise DataError(f"{path.name} is not a readable .npz or zip archive; text data (.jsonl/.csv) needs a model "
                        "that ships a tokenizer (a zipped Hugging Face directory).", hint=_DATA_HINT,
                        code="unknown_data_format")
    if len(data) > intake.max_samples:
        raise too_many_samples(len(data), intake.max_samples)
    return data


def _is_npz(path: Path) -> bool:
    with open_zip(path) as archive:
        names = archive.namelist()
    return holds_only_arrays(names)


def _image_folder(path: Path, model: LoadedModel, intake: IntakeOptions) -> Dataset:
    example = None if model.example is None else model.example.first
    if example is not None and example.ndim == 4:
        channels, side = int(example.shape[1]), int(example.shape[-1])
    else:
        channels, side = model.input_channels or 3, 224
    return load_image_folder_zip(path, intake, channels, intake.image_size or side)


def compress_files(model_path: Path | str, data_path: Path, target: Target, options: CompressOptions,
                   intake: IntakeOptions, out_dir: Path, progress: ProgressFn | None = None,
                   should_cancel: CancelFn | None = None, weights: Path | None = None, *,
                   checkpoint: CheckpointFn | None = None, resume: Checkpoint | None = None) -> Result:
    """Load the model (a file, or for the CLI package.module:factory with `weights`) and the data,
    and compress (saving and resuming from checkpoints as `compress` does); an ONNX upload is
    exported with its own input/output names, dtypes and dynamic axes."""
    intake.validate()
    model = open_model(model_path, intake, weights=weights)
    data = model.bind(open_data(Path(data_path), model, intake))
    _check_onnx_conversion(model, model_path, data)
    result = prune_and_export(model.module, data, target, options, out_dir, progress, should_cancel,
                              onnx_spec=model.onnx_spec, checkpoint=checkpoint, resume=resume)
    report = result.report.model_copy(update={"input_format": model.format,
                                              "notes": model.notes + result.report.notes})
    result = dataclasses.replace(result, report=report)
    if model.format == "hf":
        result = _save_pretrained(result, model, data, Path(out_dir))
    return write_report(result, Path(out_dir))


def _save_pretrained(result: Result, model: LoadedModel, data: Dataset, out_dir: Path) -> Result:
    """A Hugging Face upload also comes back in its own format, when the config can describe it."""
    path = out_dir / "model_hf.zip"
    reason = save_pretrained_zip(result.model, model.tokenizer, path, data.bound(result.model).inputs[:4])
    report = result.report.model_copy(update={"hf_pretrained": None if reason else path.name,
                                              "hf_pretrained_error": reason})
    artifacts = result.artifacts | ({} if reason else {path.name: path})
    return dataclasses.replace(result, report=report, artifacts=artifacts)


def _check_onnx_conversion(model: LoadedModel, model_path: Path | str, data: Dataset) -> None:
    """The converted module must compute what ONNX Runtime computes, on the user's own inputs (bound)."""
    if model.format == "onnx" and model.onnx_spec is not None:  # an ONNX upload always has its spec
        from core.intake.onnx_io import OnnxModel, check_conversion

        converted = OnnxModel(model.module, model.onnx_spec, model.notes, model.input_aliases)
        check_conversion(converted, Path(model_path), data.inputs[:32])


def inspect_files(model_path: Path | str, data_path: Path | None, target: Target | None,
                  options: CompressOptions, intake: IntakeOptions, weights: Path | None = None) -> PreflightReport:
    """The preflight report (see core.run.preflight) for files, without pruning anything."""
    intake.validate()
    model = open_model(model_path, intake, weights=weights)
    data = None if data_path is None else model.bind(open_data(Path(data_path), model, intake))
    has_data = data is not None
    if data is not None:
        _check_onnx_conversion(model, model_path, data)
    elif model.example is not None:
        data = _synthetic(model.example)
    else:
        raise DataError("This model's input shape is unknown without data.",
                        hint="Pass the calibration data too (--data).", code="data_required")
    report = preflight(model.module, data, target, options, has_data=has_data)
    return report.model_copy(update={"input_format": model.format, "notes": model.notes + report.notes})


def _synthetic(example: Inputs) -> Dataset:
    """Unlabelled inputs shaped like the format's example, for sizing a model without data."""
    return Dataset(example[torch.arange(4 * len(example)) % len(example)])
