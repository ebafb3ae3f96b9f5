"""Models with structured outputs (a dict, a tuple, a Hugging Face ModelOutput): every output keeps its
name and shape through pruning and export, and the logits are the first output or the one named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from core.data import Dataset
from core.errors import DataError, OptionsError
from core.examples import DigitsNet
from core.graph.outputs import named_outputs, select_output
from core.inputs import Inputs
from core.options import CompressOptions, Stage, Target
from core.run.pipeline import compress
from core.run.preflight import preflight
from core.tasks.check import settle_task
from core.tasks.kinds import Task
from tests.test_cli import assert_user_error, prune_args, run_main

AUX_CLASSES = 5


class Heads(nn.Module):
    """DigitsNet returning its pooled features (an embedding), its logits and a second, smaller head."""

    def __init__(self, net: DigitsNet) -> None:
        super().__init__()
        self.net = net
        self.aux = nn.Linear(net.fc.in_features, AUX_CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.flatten(self.net.pool(self.net.blocks(self.net.stem(x))), 1)
        return {"embedding": features, "logits": self.net.fc(features), "aux": self.aux(features)}


class LogitsAndFeatures(nn.Module):
    def __init__(self, net: DigitsNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.net.pool(self.net.blocks(self.net.stem(x))), 1)
        return self.net.fc(features), features


class WithFeatureMap(nn.Module):
    def __init__(self, heads: Heads) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"map": self.heads.net.stem(x), **self.heads(x)}


FAST = CompressOptions(stages=(Stage.FILTERS,), recovery_iterations=2, final_recovery_iterations=2)


@pytest.fixture
def data(digits_arrays: tuple[np.ndarray, np.ndarray]) -> Dataset:
    x, y = digits_arrays
    return Dataset(Inputs.single(torch.from_numpy(x[:600])), torch.from_numpy(y[:600]))


def test_outputs_are_named_by_their_place_in_the_structure() -> None:
    a, b, c = torch.zeros(2, 3), torch.ones(2, 4), torch.full((2, 5), 2.0)
    assert list(named_outputs(a)) == ["logits"]
    assert list(named_outputs((a, b))) == ["output_0", "output_1"]
    assert list(named_outputs({"x": a, "y": [b, c], "skip": None})) == ["x", "y.0", "y.1"]
    model_output = SequenceClassifierOutput(logits=b, hidden_states=(a, c))
    assert list(named_outputs(model_output)) == ["logits", "hidden_states.0", "hidden_states.1"]
    # the classification head: the first output, a ModelOutput's logits, or the one named
    assert select_output((a, b), None) is a
    assert select_output(SequenceClassifierOutput(loss=None, logits=b), None) is b
    assert select_output({"emb": a, "logits": b}, None) is b
    assert select_output({"x": a, "y": [b, c]}, "y.1") is c
    with pytest.raises(OptionsError, match="no output named 'z'.*x, y.0, y.1") as caught:
        select_output({"x": a, "y": [b, c]}, "z")
    assert caught.value.code == "unknown_output" and caught.value.hint


def test_a_dict_model_keeps_every_output_through_pruning_and_onnx(digits_model: DigitsNet, data: Dataset,
                                                                 tmp_path: Path) -> None:
    model = Heads(digits_model).eval()
    x = data.inputs.first[:8]
    with torch.no_grad():
        before = {name: tensor.shape for name, tensor in named_outputs(model(x)).items()}
    result = compress(model, data, Target(params_reduction=0.3, max_accuracy_drop=1.0), FAST, tmp_path)
    assert result.report.params_reduction >= 0.27

    with torch.no_grad():
        pruned = result.model(x)
    # the Python interface: the same dict, every output its shape (the embedding's width is interface)
    assert isinstance(pruned, dict) and {name: t.shape for name, t in pruned.items()} == before
    # the ONNX interface: every output by its name, agreeing with PyTorch at two batch sizes
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["embedding", "logits", "aux"]
    for batch in (1, 8):
        got = session.run(None, {session.get_inputs()[0].name: x[:batch].numpy()})
        for name, array in zip(("embedding", "logits", "aux"), got):
            assert array.shape == (batch, *before[name][1:])
            np.testing.assert_allclose(array, pruned[name][:batch].numpy(), rtol=1e-3, atol=1e-4)


def test_a_tuple_model_exports_its_outputs_in_order(digits_model: DigitsNet, data: Dataset, tmp_path: Path) -> None:
    result = compress(LogitsAndFeatures(digits_model), data, Target(params_reduction=0.3, max_accuracy_drop=1.0),
                      FAST, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(output.name, output.shape[1]) for output in session.get_outputs()] == [("output_0", 10),
                                                                                   ("output_1", 64)]
    # the first output is the logits: measured against the labels, far above chance after pruning
    assert result.report.accuracy_after > 0.5


def test_the_named_output_is_the_one_measured(digits_model: DigitsNet, data: Dataset) -> None:
    model = Heads(digits_model).eval()
    cpu = torch.device("cpu")
    data = data.bound(model)
    settled = settle_task(model, data, cpu, Task.AUTO, None)
    assert settled.handler.task is Task.CLASSIFICATION and settled.measures == "10 class logits"
    # the labels go up to 9: as logits, the 5-class head cannot hold them
    with pytest.raises(DataError) as caught:
        settle_task(model, data, cpu, Task.AUTO, "aux")
    assert caught.value.code == "labels_out_of_range"
    # an output that is not N×classes (a feature map) is refused, naming it and the model's outputs
    with pytest.raises(DataError, match=r"output 'map' has shape \(2, 32, 8, 8\).*map \(2, 32, 8, 8\)") as refused:
        settle_task(WithFeatureMap(model), data.bound(WithFeatureMap(model)), cpu, Task.CLASSIFICATION, "map")
    assert refused.value.code == "output_not_logits"
    report = preflight(model, Dataset(data.inputs[:64]), None, CompressOptions(output="aux"), has_data=True)
    assert report.num_classes == AUX_CLASSES
    assert [(row.name, row.shape) for row in report.outputs] == [("embedding", [64]), ("logits", [10]),
                                                                  ("aux", [AUX_CLASSES])]


def test_an_unknown_output_is_a_one_line_cli_error(capsys: pytest.CaptureFixture[str], digits_model: DigitsNet,
                                                   data: Dataset, tmp_path: Path) -> None:
    model_path, data_path, out = tmp_path / "heads.pt", tmp_path / "data.npz", tmp_path / "result"
    torch.save(Heads(digits_model), model_path)
    np.savez(data_path, x=data.inputs.first.numpy(), y=data.y.numpy())
    code, _, err = run_main(capsys, *prune_args(model_path, data_path, out, "--macs-reduction", 0.3,
                                                "--output", "scores"))
    assert_user_error(code, err, out, "no output named 'scores'", "embedding, logits, aux")
