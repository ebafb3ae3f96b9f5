"""A BERT classifier exported to ONNX as the usual exporters do it (input_ids, attention_mask and
token_type_ids, int64, dynamic batch and sequence axes), trained on a token task where the mask
decides the answer: converted, pruned by a quarter of its parameters through compress_files, and
exported with its three inputs as they were declared."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.intake.files import compress_files, inspect_files
from core.options import CompressOptions, IntakeOptions, Target
from core.report import InputSignature
from tests.multi_input_models import LENGTH, Tokens, fit, token_task

transformers = pytest.importorskip("transformers")

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
FAST = CompressOptions(recovery_iterations=20, final_recovery_iterations=60, latency_runs=1, batch_size=64, seed=0)
BUDGET = 0.01


def _feed(tokens: Tokens) -> dict[str, np.ndarray]:
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
            "token_type_ids": np.zeros_like(tokens.input_ids)}


def _trained_bert(steps: int = 300) -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64, num_labels=2,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    tokens = token_task(4096, seed=1)
    return fit(model, _feed(tokens), tokens.labels, steps, lr=1e-3)


@pytest.fixture(scope="module")
def upload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("bert-onnx")
    path = directory / "bert.onnx"
    example = tuple(torch.from_numpy(array) for array in _feed(token_task(2, seed=4)).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_trained_bert(), example, str(path), dynamo=False, opset_version=17, input_names=NAMES,
                          output_names=["logits"],
                          dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in NAMES},
                                        "logits": {0: "batch"}})
    tokens = token_task(768)
    data = directory / "data.npz"
    np.savez(data, **_feed(tokens), labels=tokens.labels)
    return path, data


def _accuracy(session: ort.InferenceSession, tokens: Tokens) -> float:
    (logits,) = session.run(None, _feed(tokens))
    return float((logits.argmax(1) == tokens.labels).mean())


def test_bert_onnx_with_three_inputs_is_pruned_and_keeps_its_interface(upload, tmp_path):
    model, data = upload
    # without data the preflight sizes it on ids, masks of ones and types of a sequence of 8
    without_data = inspect_files(model, None, None, FAST, IntakeOptions())
    assert without_data.inputs == [InputSignature(name=name, dtype="int64", shape=[8]) for name in NAMES]

    result = compress_files(model, data, Target(params_reduction=0.3, max_accuracy_drop=BUDGET), FAST,
                            IntakeOptions(), tmp_path / "out")
    report = result.report
    assert report.target_met and report.params_reduction >= 0.25, report.message
    assert report.accuracy_before >= 0.95, "the task is learnt, so accuracy means something"
    # the residual stream and the attention values feed reshapes into heads; they are left whole, and said so
    assert any("left unpruned" in note for note in report.notes), report.notes

    original = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pruned = ort.InferenceSession(str(result.artifacts["model.onnx"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in pruned.get_inputs()] == \
        [(i.name, i.type, i.shape) for i in original.get_inputs()] == \
        [(name, "tensor(int64)", ["batch", "sequence"]) for name in NAMES]
    assert [o.name for o in pruned.get_outputs()] == ["logits"]
    for batch, length in ((1, LENGTH), (5, 20)):
        feed = _feed(token_task(batch, length=length, seed=7))
        (logits,) = pruned.run(None, feed)
        with torch.no_grad():
            expected = result.model(**{name: torch.from_numpy(array) for name, array in feed.items()})
        assert logits.shape == (batch, 2) and np.allclose(logits, expected.numpy(), atol=1e-4)
    unseen = token_task(1000, seed=2)
    assert _accuracy(pruned, unseen) >= _accuracy(original, unseen) - BUDGET
