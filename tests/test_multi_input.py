"""Models with several named inputs end to end: a user's token classifier (ids and attention mask, from
an .npz) through the CLI and compress_files, a two-input vision model through compress, and each way
the data's arrays can fail to match the model's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core import cli
from core.data import Dataset
from core.errors import UserError
from core.inputs import Inputs
from core.intake.files import compress_files, inspect_files
from core.options import CompressOptions, IntakeOptions, Target
from core.report import InputSignature
from core.run.pipeline import compress
from tests.multi_input_models import LENGTH, ImageAndFeatures, token_task, write_token_files

FACTORY = "tests.multi_input_models:token_classifier"
FAST = CompressOptions(recovery_iterations=20, final_recovery_iterations=60, latency_runs=1, batch_size=64, seed=0)
BUDGET = 0.03


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    weights, data, _ = write_token_files(tmp_path_factory.mktemp("tokens"))
    return weights, data


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_token_classifier_from_an_npz_is_pruned_and_exported_with_both_inputs(token_files, tmp_path):
    weights, data = token_files
    intake = IntakeOptions()
    preflight = inspect_files(FACTORY, data, None, FAST, intake, weights=weights)
    assert preflight.inputs == [InputSignature(name="input_ids", dtype="int64", shape=[LENGTH]),
                                InputSignature(name="attention_mask", dtype="int64", shape=[LENGTH])]
    assert (preflight.input_shape, preflight.input_dtype) == ([LENGTH], "int64")

    result = compress_files(FACTORY, data, Target(params_reduction=0.3, max_accuracy_drop=BUDGET), FAST, intake,
                            tmp_path / "out", weights=weights)
    report = result.report
    assert report.target_met and report.params_reduction >= 0.25, report.message
    assert report.accuracy_before >= 0.95, "the synthetic task is learnt, so accuracy means something"
    assert report.accuracy_before - report.accuracy_after <= BUDGET

    session = _session(result.artifacts["model.onnx"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("input_ids", "tensor(int64)"),
                                                                ("attention_mask", "tensor(int64)")]
    for batch, length in ((1, LENGTH), (5, 20)):
        tokens = token_task(batch, length=length, seed=7)
        feed = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
        (logits,) = session.run(None, feed)
        with torch.no_grad():
            expected = result.model(**{name: torch.from_numpy(array) for name, array in feed.items()}).numpy()
        assert logits.shape == (batch, 2) and np.allclose(logits, expected, atol=1e-4)
    # the mask decides which tokens count: the same ids under another mask give other outputs
    tokens = token_task(64, seed=3)
    (masked,) = session.run(None, {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
    (unmasked,) = session.run(None, {"input_ids": tokens.input_ids,
                                     "attention_mask": np.ones_like(tokens.attention_mask)})
    assert (masked.argmax(1) == tokens.labels).mean() >= 0.9
    assert not np.allclose(masked, unmasked, atol=1e-2)
    assert (unmasked.argmax(1) == tokens.labels).mean() < (masked.argmax(1) == tokens.labels).mean()


def test_token_classifier_through_the_cli(token_files, tmp_path, capsys):
    weights, data = token_files
    out = tmp_path / "result"
    code = cli.main(["prune", FACTORY, "--weights", str(weights), "--data", str(data), "--out", str(out),
                     "--params-reduction", "0.3", "--max-accuracy-drop", str(BUDGET), "--recovery-iterations", "20",
                     "--final-recovery-epochs", "5", "--batch-size", "64"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["target_met"] and report["params_reduction"] >= 0.25
    session = _session(out / "model.onnx")
    tokens = token_task(3, length=9, seed=5)
    (logits,) = session.run(None, {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
    assert logits.shape == (3, 2)


def test_two_input_vision_model_is_exported_with_both_named_inputs(tmp_path):
    torch.manual_seed(0)
    model = ImageAndFeatures().eval()
    inputs = Inputs({"image": torch.rand(48, 3, 12, 12), "features": torch.randn(48, 6)})
    with torch.no_grad():
        labels = inputs.call(model).argmax(1)
    options = CompressOptions(recovery_iterations=2, final_recovery_iterations=2, latency_runs=1, batch_size=16)
    result = compress(model, Dataset(inputs, labels), Target(macs_reduction=0.4, max_accuracy_drop=1.0), options,
                      tmp_path)
    assert result.report.macs_reduction >= 0.3
    session = _session(tmp_path / "model.onnx")
    assert [(i.name, i.type) for i in session.get_inputs()] == [("image", "tensor(float)"),
                                                                ("features", "tensor(float)")]
    sample = inputs[torch.arange(3)]
    (logits,) = session.run(None, sample.numpy())
    with torch.no_grad():
        assert np.allclose(logits, sample.call(result.model).numpy(), atol=1e-4)
    reloaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(reloaded(*sample.tensors.values()), sample.call(result.model), atol=1e-4)


def _bad_arrays(case: str) -> dict[str, np.ndarray]:
    tokens = token_task(32)
    arrays = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask, "labels": tokens.labels}
    if case == "missing":
        del arrays["attention_mask"]
    elif case == "extra":
        arrays["token_type_ids"] = np.zeros_like(tokens.input_ids)
    elif case == "length":
        arrays["attention_mask"] = tokens.attention_mask[:30]
    elif case == "float_ids":
        arrays["input_ids"] = tokens.input_ids.astype(np.float32)
    return arrays


BAD = [  # case, error code, words the message names
    ("missing", "missing_input",
     ["requires attention_mask", "found: input_ids", "expected: input_ids, attention_mask"]),
    ("extra", "unexpected_input",
     ["no input named token_type_ids", "found: input_ids, attention_mask, token_type_ids"]),
    ("length", "inputs_length_mismatch", ["input_ids: 32", "attention_mask: 30"]),
    ("float_ids", "float_token_ids", ["input_ids", "float32", "int64"]),
]


@pytest.mark.parametrize(("case", "code", "words"), BAD, ids=[case for case, _, _ in BAD])
def test_data_that_does_not_match_the_inputs_is_refused(token_files, tmp_path, capsys, case, code, words):
    weights, _ = token_files
    data = tmp_path / "bad.npz"
    np.savez(data, **_bad_arrays(case))
    with pytest.raises(UserError) as info:
        inspect_files(FACTORY, data, None, FAST, IntakeOptions(), weights=weights)
    assert info.value.code == code, str(info.value)
    for word in words:
        assert word in str(info.value)

    out = tmp_path / "result"
    exit_code = cli.main(["prune", FACTORY, "--weights", str(weights), "--data", str(data), "--out", str(out),
                          "--params-reduction", "0.3"])
    err = capsys.readouterr().err
    assert exit_code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and words[0] in err
    assert not out.exists() or not any(out.iterdir())


class _Optional(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        return torch.stack([(input_ids * mask).sum(1), types.sum(1)], dim=1).float()


class _Varargs(torch.nn.Module):
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return torch.cat([a.float() for a in args], dim=1)


def test_binding_names_orders_and_calls_by_the_forward_signature():
    ids = torch.arange(12).reshape(3, 4)
    # a single unnamed input feeds the only required parameter, whatever it is called
    sequential = torch.nn.Sequential(torch.nn.Linear(4, 2))
    bound = Inputs.single(ids.float()).bind(sequential)
    assert bound.names == ["input"] and bound.call(sequential).shape == (3, 2)
    # forward-parameter order; an optional parameter the data lacks keeps its default
    bound = Inputs({"attention_mask": torch.zeros_like(ids), "input_ids": ids}).bind(_Optional())
    assert bound.names == ["input_ids", "attention_mask"]
    assert bound.call(_Optional()).tolist() == [[0.0, 0.0]] * 3
    # a forward that only takes *args is called positionally, in the data's order
    bound = Inputs({"b": ids, "a": -ids}).bind(_Varargs())
    assert bound.positional and bound.call(_Varargs())[:, :4].equal(ids.float())
    assert isinstance(bound.example_inputs, tuple)


def test_inputs_slice_index_and_describe_every_tensor_alike():
    inputs = Inputs({"image": torch.rand(5, 3, 2, 2), "mask": torch.ones(5, 7, dtype=torch.bool)})
    assert len(inputs) == 5 and len(inputs[1:3]) == 2
    picked = inputs[torch.tensor([4, 0])]
    assert picked.tensors["mask"].shape == (2, 7) and picked.tensors["image"].equal(inputs.tensors["image"][[4, 0]])
    assert [(s.name, s.dtype_name, s.shape, s.is_sequence) for s in inputs.signature] == [
        ("image", "float32", (3, 2, 2), False), ("mask", "bool", (7,), True)]
    assert {name: array.dtype for name, array in inputs.numpy().items()} == {"image": np.float32, "mask": np.bool_}
    with pytest.raises(TypeError):
        inputs.tensors["other"] = torch.zeros(5)  # type: ignore[index]
