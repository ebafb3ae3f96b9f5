"""ONNX in -> ONNX out: load_onnx, check_conversion, compress with the original interface, and bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, external_data_helper, helper, numpy_helper
from torch import nn

from core.data import Dataset
from core.errors import InputFileError
from core.inputs import Inputs
from core.intake.onnx_io import check_conversion, load_onnx
from core.options import CompressOptions, Target
from core.report import Report
from core.run.pipeline import compress

OPTIONS = CompressOptions(recovery_iterations=1, final_recovery_iterations=1, batch_size=8, calibration_samples=16,
                          latency_runs=1, latency_batch=2)


class FlattenNet(nn.Module):
    """Flattens with view(N, -1): a constant-shape Reshape in ONNX exported at a fixed batch."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(x.view(x.size(0), -1))


class PoolNet(nn.Module):
    """Fully convolutional with global pooling: takes any image size."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamic_axes: dict | None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["scores"], dynamic_axes=dynamic_axes)
    return path


BATCH_AXES = {"pixel_values": {0: "batch"}, "scores": {0: "batch"}}


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _export(FlattenNet(), torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("onnx") / "net.onnx", BATCH_AXES)


def _round_trip(path: Path, x: torch.Tensor, out: Path, stages: tuple[str, ...] = ("filters",)) -> Report:
    """load -> check -> compress -> the written model.onnx keeps the interface and runs at batch 1 and 3."""
    loaded = load_onnx(path)
    assert check_conversion(loaded, path, loaded.bind(Inputs.single(x[:4]))) < 1e-4
    with torch.no_grad():
        labels = loaded.module(x).argmax(1)
    options = CompressOptions(**{**OPTIONS.__dict__, "stages": stages})
    target = Target(macs_reduction=0.5, max_accuracy_drop=1.0)
    result = compress(loaded.module, Dataset(Inputs.single(x), labels), target, options, out, onnx_spec=loaded.spec)
    report = result.report
    assert report.target_met, report.message
    assert abs(report.macs_reduction - 0.5) <= 0.03 or report.macs_reduction >= 0.47, report.macs_reduction

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in original.get_inputs()]
    assert [o.name for o in session.get_outputs()] == [o.name for o in original.get_outputs()][:1]
    assert session.get_inputs()[0].type == original.get_inputs()[0].type
    with torch.no_grad():
        expected = result.model.eval()(x[:3]).numpy()
    for batch in (1, 3):
        (got,) = session.run(None, {"pixel_values": x[:batch].numpy()})
        assert np.abs(got - expected[:batch]).max() <= 1e-3 * max(np.abs(expected).max(), 1.0)
    return report


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_round_trip_keeps_the_interface(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    path = _export(model, torch.randn(1, 3, 64, 64), tmp_path / f"{name}.onnx", BATCH_AXES)
    report = _round_trip(path, torch.randn(20, 3, 64, 64), tmp_path / "out", stages=("filters", "layers"))
    assert report.pt2_error is None, report.pt2_error


def test_constant_reshape_at_fixed_batch_survives_pruning(tmp_path: Path) -> None:
    """A fixed-batch export hard-codes [1, 1024] as the Reshape target; pruning and other batch sizes need flatten."""
    torch.manual_seed(0)
    path = _export(FlattenNet(), torch.randn(1, 3, 16, 16), tmp_path / "fixed.onnx", None)
    loaded = load_onnx(path)
    assert any("fixed batch size" in note for note in loaded.notes)
    _round_trip(path, torch.randn(24, 3, 16, 16), tmp_path / "out")
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 16, 16]


def test_every_dynamic_axis_is_kept(tmp_path: Path) -> None:
    torch.manual_seed(0)
    axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, "scores": {0: "batch"}}
    path = _export(PoolNet(), torch.randn(1, 3, 16, 16), tmp_path / "pool.onnx", axes)
    assert load_onnx(path).spec.dynamic_axes["pixel_values"] == {0: "batch", 2: "height", 3: "width"}
    _round_trip(path, torch.randn(24, 3, 16, 16), tmp_path / "out")
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    (scores,) = session.run(None, {"pixel_values": np.zeros((2, 3, 24, 20), np.float32)})
    assert scores.shape == (2, 10)


def _fails(path: Path, code: str, fragment: str) -> InputFileError:
    with pytest.raises(InputFileError) as caught:
        load_onnx(path)
    assert caught.value.code == code, caught.value
    assert fragment in caught.value.message, caught.value.message
    assert caught.value.hint
    return caught.value


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert "torch.onnx.export" in _fails(path, "invalid_onnx", "empty").hint


def test_truncated_file(small_onnx: Path, tmp_path: Path) -> None:
    path = tmp_path / "half.onnx"
    data = small_onnx.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _fails(path, "invalid_onnx", "half.onnx")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(seed: int, tmp_path: Path) -> None:
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    _fails(path, "invalid_onnx", "noise.onnx")


def test_missing_file(tmp_path: Path) -> None:
    _fails(tmp_path / "nope.onnx", "file_not_found", "not found")


def _save(graph: onnx.GraphProto, path: Path, **opsets: int) -> Path:
    imports = [helper.make_opsetid("", 17)] + [helper.make_opsetid(domain, v) for domain, v in opsets.items()]
    onnx.save(helper.make_model(graph, opset_imports=imports), str(path))
    return path


def test_unsupported_ops_are_all_named(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Hardmax", ["x"], ["h"]), helper.make_node("FancyOp", ["h"], ["y"], domain="com.example")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    error = _fails(_save(graph, tmp_path / "custom.onnx", **{"com.example": 1}), "unsupported_onnx_ops", "Hardmax")
    assert "FancyOp (com.example opset 1)" in error.message


def _with_external_weight(path: Path, location: str) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    external_data_helper.set_external_data(weight, location=location)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=[weight],
    )
    return _save(graph, path)


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "/etc/passwd", "C:\\secret.bin"])
def test_external_data_outside_the_directory_is_refused(location: str, tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(np.ones(16, np.float32).tobytes())
    upload = tmp_path / "upload"
    upload.mkdir()
    _fails(_with_external_weight(upload / "model.onnx", location), "onnx_external_data", repr(location))


def test_external_data_missing_beside_the_model(tmp_path: Path) -> None:
    _fails(_with_external_weight(tmp_path / "model.onnx", "weights.bin"), "onnx_external_data", "missing")


def test_external_data_beside_the_model_is_loaded(tmp_path: Path) -> None:
    path = _with_external_weight(tmp_path / "model.onnx", "weights.bin")
    (tmp_path / "weights.bin").write_bytes(np.full(16, 2.0, np.float32).tobytes())
    loaded = load_onnx(path)
    x = torch.ones(3, 4)
    assert torch.equal(loaded.module(x), torch.full((3, 4), 8.0))
    assert check_conversion(loaded, path, loaded.bind(Inputs.single(x))) == 0.0


def test_inputs_with_names_python_cannot_take_are_bound_by_their_onnx_names(tmp_path: Path) -> None:
    """onnx2torch numbers its forward parameters; they take the ONNX names, made into identifiers."""
    names = ["input", "input.1", "class"]
    graph = helper.make_graph(
        [helper.make_node("Sub", ["input", "input.1"], ["d"]), helper.make_node("Mul", ["d", "class"], ["y"])], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4]) for name in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = _save(graph, tmp_path / "three.onnx")
    loaded = load_onnx(path)
    assert loaded.spec.input_names == names
    assert loaded.parameters == {"input": "input", "input.1": "input_1_", "class": "_class"}
    assert loaded.example is not None and loaded.example.names == ["input", "input_1_", "_class"]
    a, b, c = (torch.randn(3, 4) for _ in names)
    bound = loaded.bind(Inputs({"class": c, "input.1": b, "input": a}))
    assert torch.allclose(bound.call(loaded.module), (a - b) * c)
    assert check_conversion(loaded, path, bound) < 1e-5


def test_inputs_that_are_not_tensors_are_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["s", "i"], ["y"])], "g",
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    _fails(_save(graph, tmp_path / "sequence.onnx"), "unsupported_onnx_inputs", "not tensors (s)")


def test_an_input_no_output_depends_on_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["y"])], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4]) for name in ("a", "spare")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    _fails(_save(graph, tmp_path / "spare.onnx"), "unused_onnx_inputs", "spare")


def test_transformer_export_ops_convert_exactly(tmp_path: Path) -> None:
    """What BERT's export needs beyond onnx2torch: GreaterOrEqual at opset 16+, Flatten over every axis
    (the mask's Flatten(axis=2) of [batch, sequence]), and MatMul + Add by constants as a prunable Linear."""
    weight, bias = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 7, "w"), \
        numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float32), "b")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("GreaterOrEqual", ["x", "zero"], ["positive"]),
         helper.make_node("Flatten", ["positive"], ["flat"], axis=3)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 3]),
         helper.make_tensor_value_info("flat", TensorProto.BOOL, [None, 1])],
        initializer=[weight, bias, zero],
    )
    path = _save(graph, tmp_path / "ops.onnx")
    loaded = load_onnx(path)
    linears = [m for m in loaded.module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].bias is not None
    x = torch.randn(5, 7, 4)
    assert check_conversion(loaded, path, loaded.bind(Inputs.single(x))) < 1e-5
    y, flat = loaded.module(x)
    assert y.shape == (5, 7, 3) and flat.shape == (5 * 7 * 4, 1) and flat.squeeze(1).equal((x >= 0).flatten())


def test_check_conversion_reports_a_mismatch(small_onnx: Path) -> None:
    loaded = load_onnx(small_onnx)
    x = loaded.bind(Inputs.single(torch.randn(4, 3, 16, 16)))
    assert check_conversion(loaded, small_onnx, x) < 1e-4
    with torch.no_grad():
        loaded.module.get_submodule("fc/Gemm").bias.add_(1.0)
    with pytest.raises(InputFileError) as caught:
        check_conversion(loaded, small_onnx, x)
    assert caught.value.code == "onnx_conversion_mismatch"
    assert "max abs diff" in caught.value.message and "relative" in caught.value.message
