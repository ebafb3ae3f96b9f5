"""Structure: torchvision detectors and segmenters (random weights, small inputs) keep their predictors
whole, lose at least 30 % of their MACs (to a plan, and through `compress` end to end), offer Stage 2
blocks, and export to ONNX models that ONNX Runtime runs to PyTorch's outputs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision.models import detection, segmentation

from core.data import Dataset
from core.errors import ExportError
from core.export.artifacts import export_onnx, verify_onnx
from core.export.detections import detection_difference
from core.graph.blocks import find_blocks, remove_block
from core.graph.detectors import OUTPUTS, TensorDetector, as_tensor_model
from core.graph.outputs import named_outputs
from core.graph.predictors import output_layers
from core.inputs import Inputs
from core.measure.size import count_macs_params
from core.options import CompressOptions, Target
from core.run.pipeline import compress
from core.surgery.apply import apply_plan
from core.surgery.groups import build_graph, prunable_groups
from core.surgery.plan import make_plan
from core.surgery.trial import survives_channel_cut
from core.tasks.kinds import Task

SIZE = 64
CLASSES = 5
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    # a score threshold of 0 keeps every candidate, so each image has the full K detections to compare;
    # K is 50 rather than 100 / 300: mAP against the original costs a Python loop per detection
    "fasterrcnn_mobilenet_v3_large_320_fpn": lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, box_detections_per_img=50),
    "ssdlite320_mobilenet_v3_large": lambda: detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, score_thresh=0.0, detections_per_img=50),
    "fcn_resnet50": lambda: segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, aux_loss=True, num_classes=CLASSES),
    "lraspp_mobilenet_v3_large": lambda: segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=CLASSES),
}
_SSD_HEADS = [f"detector.head.{head}.module_list.{level}.1"
              for head in ("regression_head", "classification_head") for level in range(6)]
PREDICTORS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ["detector.roi_heads.box_predictor.cls_score",
                                              "detector.roi_heads.box_predictor.bbox_pred"],
    "ssdlite320_mobilenet_v3_large": _SSD_HEADS,
    "fcn_resnet50": ["classifier.4", "aux_classifier.4"],
    "lraspp_mobilenet_v3_large": ["classifier.low_classifier", "classifier.high_classifier"],
}


def _calibrated(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """`model` with BatchNorm statistics measured on `images`. With torchvision's initial statistics a
    random network's features fade to ~1e-8 over its depth: every detection then scores alike, and
    runtimes rank the ties differently."""
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one pass gives the statistics of `images`
        norm.train()  # only the norms: a detector in train mode wants targets
    with torch.no_grad():
        model(images)
    return model.eval()


def _model(name: str) -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    images = torch.rand(4, 3, SIZE, SIZE)
    model = _calibrated(as_tensor_model(BUILDERS[name]()), images)
    return model, Inputs.single(images).bind(model)


def _shapes(model: nn.Module, inputs: Inputs) -> dict[str, torch.Size]:
    with torch.no_grad():
        return {name: t.shape for name, t in named_outputs(inputs.call(model)).items()}


def _widths(model: nn.Module, names: list[str]) -> list[int]:
    layers = [model.get_submodule(name) for name in names]
    return [layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
            for layer in layers]


def test_lraspp_keeps_its_predictors_loses_a_third_of_its_macs_to_a_plan_and_exports(tmp_path: Path) -> None:
    name = "lraspp_mobilenet_v3_large"
    model, inputs = _model(name)
    example = inputs[:2]
    shapes = _shapes(model, inputs)
    macs = count_macs_params(model, example)[0]
    predictors = output_layers(model, example)
    assert predictors == PREDICTORS[name]
    widths = _widths(model, predictors)

    graph = build_graph(model, example)
    groups = prunable_groups(graph, model, [model.get_submodule(p) for p in predictors], {}, 0.125, 1,
                             lambda group: survives_channel_cut(model, example, graph, group), check_every_group=True)
    assert not {group.key.name for group in groups} & set(predictors)
    plan = make_plan(groups, [torch.zeros(group.width) for group in groups],
                     int(0.6 * sum(group.capacity for group in groups)), 8)
    apply_plan(model, example, plan)
    assert count_macs_params(model, example)[0] <= 0.7 * macs
    assert _widths(model, predictors) == widths
    assert _shapes(model, inputs) == shapes

    blocks = find_blocks(model, example)
    assert blocks
    shallower = copy.deepcopy(model)
    remove_block(shallower, blocks[0])
    assert _shapes(shallower, inputs) == shapes

    path = tmp_path / "model.onnx"
    export_onnx(model, example, path)
    verify_onnx(model, path, inputs)  # raises where ONNX Runtime disagrees with PyTorch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.first.numpy()})
    assert [value.name for value in session.get_outputs()] == list(shapes)
    assert [array.shape for array in got] == list(shapes.values())


OPTIONS = CompressOptions(recovery_iterations=1, final_recovery_iterations=1, batch_size=4, calibration_samples=8,
                          latency_runs=1, latency_batch=2)
TASKS = {"fasterrcnn_mobilenet_v3_large_320_fpn": Task.DETECTION, "ssdlite320_mobilenet_v3_large": Task.DETECTION,
         "fcn_resnet50": Task.SEGMENTATION, "lraspp_mobilenet_v3_large": Task.SEGMENTATION}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDERS))
def test_compresses_to_a_third_fewer_macs_end_to_end(name: str, tmp_path: Path) -> None:
    model, _ = _model(name)
    torch.manual_seed(1)
    images = torch.rand(16, 3, SIZE, SIZE)
    # a detector goes in as torchvision builds it: compress runs it as a TensorDetector
    given = model.detector if isinstance(model, TensorDetector) else model
    result = compress(given, Dataset(Inputs.single(images)), Target(macs_reduction=0.3, max_accuracy_drop=1.0),
                      OPTIONS, tmp_path)
    report = result.report
    assert report.task is TASKS[name]
    assert report.target_met, report.message
    assert abs(report.macs_reduction - 0.3) <= 0.03, report.macs_reduction
    pruned = result.model.eval()
    inputs = Inputs.single(images).bind(pruned)
    assert count_macs_params(pruned, inputs[:1])[0] == report.macs_after
    assert _widths(pruned, PREDICTORS[name]) == _widths(model, PREDICTORS[name])

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_outputs()]
    assert names == list(_shapes(model, inputs))
    with torch.no_grad():
        if isinstance(pruned, TensorDetector):
            for i in range(4):
                expected = {key: t.numpy() for key, t in pruned(images[i : i + 1]).items()}
                got = session.run(None, {session.get_inputs()[0].name: images[i : i + 1].numpy()})
                detection_difference(expected, dict(zip(names, got)))  # raises where they differ
        else:
            expected_maps = [t.numpy() for t in named_outputs(pruned(images)).values()]
            got_maps = session.run(None, {session.get_inputs()[0].name: images.numpy()})
            for want, have in zip(expected_maps, got_maps, strict=True):
                assert np.abs(have - want).max() <= 1e-3 * max(float(np.abs(want).max()), 1.0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_output_layers_are_the_predictors(name: str) -> None:
    model, inputs = _model(name)
    assert output_layers(model, inputs[:2]) == PREDICTORS[name]


def test_a_detector_pads_its_detections_and_is_the_detector_in_training() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE)
    # a threshold that leaves fewer than the 300 detections per image SSDlite reports
    raw = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, score_thresh=0.08)
    model = _calibrated(TensorDetector(raw), images)
    with torch.no_grad():
        expected = raw(list(images))
        padded = model(images)
    assert list(padded) == list(OUTPUTS)
    for image, found in enumerate(expected):
        n = len(found["scores"])
        assert 0 < n < 300
        assert int(padded["num_detections"][image]) == n
        for key in OUTPUTS[:3]:
            assert padded[key].shape[:2] == (2, 300)
            assert torch.equal(padded[key][image, :n], found[key])
            assert not padded[key][image, n:].any()

    model.train()
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([3])}] * 2
    losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}


def _detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, np.ndarray]:
    return {"boxes": np.array([boxes], dtype=np.float32), "scores": np.array([scores], dtype=np.float32),
            "labels": np.array([labels]), "num_detections": np.array([len(scores)])}


def test_detections_may_swap_only_where_their_scores_tie() -> None:
    reference = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], [0.9, 0.5, 0.5], [1, 2, 3])
    swapped = _detections([[0, 0, 10, 10], [1, 1, 2, 2], [5, 5, 20, 20]], [0.9, 0.5, 0.5], [1, 3, 2])
    assert detection_difference(reference, swapped) == 0.0
    untied = _detections([[5, 5, 20, 20], [0, 0, 10, 10], [1, 1, 2, 2]], [0.9, 0.5, 0.5], [2, 1, 3])
    with pytest.raises(ExportError):
        detection_difference(reference, untied)
    moved = _detections([[0, 0, 10, 10], [5, 5, 21, 20], [1, 1, 2, 2]], [0.9, 0.5, 0.5], [1, 2, 3])
    with pytest.raises(ExportError):
        detection_difference(reference, moved)
    with pytest.raises(ExportError):
        detection_difference(reference, reference | {"num_detections": np.array([2])})
