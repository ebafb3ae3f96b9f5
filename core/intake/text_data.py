"""Text data for models that ship a tokenizer: `.jsonl` (one object per line) or `.csv`,
with a text column and an optional label column: class or group ids (or the model's label names), or
float targets (a number, or in .jsonl a list of numbers, per record). Whether they fit the run's task is
the task's to check (core.tasks). For a causal language model the texts become windows of tokens without
labels: the tokens are their own targets."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from core.data import Dataset
from core.errors import DataError
from core.inputs import Inputs

_HINT = 'One record per sample: {"text": "...", "label": 1} per line (.jsonl) or a CSV with text,label columns.'


def read_records(path: Path, max_samples: int) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name} is not UTF-8 text.", hint="Save the file as UTF-8.", code="invalid_text_data") \
            from exc
    records = _jsonl(text, path.name) if text.lstrip().startswith("{") else _csv(text)
    if len(records) < 2:
        raise DataError(f"{path.name} holds {len(records)} record(s); at least 2 are needed.", hint=_HINT,
                        code="invalid_text_data")
    if len(records) > max_samples:
        raise DataError(f"{path.name} holds {len(records)} records; at most {max_samples} are accepted.",
                        hint="Upload a random subset.", code="too_many_samples")
    return records


def _jsonl(text: str, name: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {number} is not valid JSON ({exc.msg}).", hint=_HINT,
                            code="invalid_text_data") from exc
        if not isinstance(record, dict):
            raise DataError(f"{name} line {number} is not a JSON object.", hint=_HINT, code="invalid_text_data")
        records.append(record)
    return records


def _csv(text: str) -> list[dict[str, Any]]:
    return list(csv.DictReader(io.StringIO(text)))


def _texts(records: list[dict[str, Any]], text_column: str) -> list[str]:
    columns = set().union(*(record.keys() for record in records))
    if text_column not in columns:
        raise DataError(f"The text data has no {text_column!r} column (found: {', '.join(sorted(columns))}).",
                        hint=f"Name the column {text_column!r}, or set text_column in the job config.",
                        code="missing_text_column")
    return [str(record.get(text_column) or "") for record in records]


def tokenize(records: list[dict[str, Any]], tokenizer: Any, text_column: str, label_column: str,
             max_length: int, label_names: list[str] | None) -> Dataset:
    texts = _texts(records, text_column)
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length)
    # every array the tokenizer makes (ids, attention mask, token types) is an input of the model
    inputs = Inputs({name: torch.tensor(values, dtype=torch.int64) for name, values in encoded.items()})
    has_labels = any(label_column in record for record in records)
    y = _labels([record.get(label_column) for record in records], label_names) if has_labels else None
    return Dataset(inputs, y)


def windows(records: list[dict[str, Any]], tokenizer: Any, text_column: str, max_length: int) -> Dataset:
    """The records' texts as `token_windows` of `max_length` tokens, for a causal language model (a label
    column is not read: the tokens are the targets)."""
    return Dataset(token_windows(_texts(records, text_column), tokenizer, max_length))


def token_windows(texts: list[str], tokenizer: Any, length: int) -> Inputs:
    """`input_ids` of the texts' tokens end to end (the end-of-text token between texts, where the tokenizer
    has one), cut into windows of `length`, and their `attention_mask`: all ones, since every position is a
    real token, but an input of the export all the same, which then takes padded batches as a causal LM's
    ONNX export usually does. The tokens after the last full window are dropped, unless there are fewer than
    `length` in all."""
    separator = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [*ids, *separator]
    if len(stream) < 2:
        raise DataError(f"The texts hold {len(stream)} token(s); a causal language model needs at least 2.",
                        hint="Upload longer texts.", code="sequence_too_short")
    width = min(length, len(stream))
    count = len(stream) // width
    ids = torch.tensor(stream[: count * width], dtype=torch.int64).view(count, width)
    return Inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


Label = int | float | list[float]


def _labels(values: list[Any], names: list[str] | None) -> torch.Tensor:
    """Integer labels as int64 (N,); with any float or list among them, float32 targets (N,) or (N, D)."""
    labels = [_label(value, names, i) for i, value in enumerate(values)]
    if all(isinstance(label, int) for label in labels):
        return torch.tensor(labels, dtype=torch.int64)
    rows = [label if isinstance(label, list) else [label] for label in labels]
    if len({len(row) for row in rows}) > 1:
        raise DataError(f"The labels hold target lists of different lengths ({min(map(len, rows))} to "
                        f"{max(map(len, rows))}).", hint="Give every record a target of the same length.",
                        code="invalid_labels")
    y = torch.tensor(rows, dtype=torch.float32)
    if not bool(y.isfinite().all()):
        raise DataError("The labels contain NaN or Inf.", hint="Clean or drop those records.", code="invalid_labels")
    return y if any(isinstance(label, list) for label in labels) else y[:, 0]


def _label(value: Any, names: list[str] | None, index: int) -> Label:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return [float(v) for v in value]
    text = str(value).strip() if value is not None else ""
    if text.lstrip("-").isdigit():
        return int(text)
    if names and text in names:
        return names.index(text)
    try:
        return float(text)
    except ValueError:
        pass
    raise DataError(f"Record {index + 1} has label {value!r}, which is neither a class id, one of the model's "
                    f"labels ({', '.join(names or []) or 'the model names none'}) nor a number.",
                    hint="Use class ids 0..num_classes-1, the label names in the model's config, or numeric targets.",
                    code="invalid_labels")
