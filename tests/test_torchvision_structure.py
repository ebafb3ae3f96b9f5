"""Structure: torchvision architectures (random weights, small inputs) compress to ~50 % MACs
and come out as working PyTorch, ONNX and .pt2 models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

from core.data import Dataset
from core.inputs import Inputs
from core.measure.size import count_macs_params
from core.options import CompressOptions, Target
from core.run.pipeline import compress

# Two quick ones run in every test run; the rest are marked slow.
FAST_MODELS = ["resnet18", "mobilenet_v3_small"]
SLOW_MODELS = [
    "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121", "vgg11_bn", "shufflenet_v2_x1_0",
    "regnet_y_400mf", "convnext_tiny", "googlenet",
]
OPTIONS = CompressOptions(recovery_iterations=1, final_recovery_iterations=1, batch_size=8, calibration_samples=16,
                          latency_runs=1, latency_batch=2)


def _check(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(20, 3, 32, 32)
    result = compress(model, Dataset(Inputs.single(x)), Target(macs_reduction=0.5, max_accuracy_drop=1.0), OPTIONS,
                      tmp_path)
    report = result.report
    assert report.target_met, report.message
    assert abs(report.macs_reduction - 0.5) <= 0.03, report.macs_reduction
    pruned = result.model.eval()
    assert count_macs_params(pruned, Inputs.single(x[:1]))[0] == report.macs_after

    with torch.no_grad():
        expected = pruned(x).numpy()
    assert expected.shape == (20, 10)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-3 * max(np.abs(expected).max(), 1.0)

    assert report.pt2_error is None, report.pt2_error
    reloaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    assert torch.allclose(reloaded(x), torch.from_numpy(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAST_MODELS)
def test_compresses_to_half_the_macs(name: str, tmp_path: Path) -> None:
    _check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_compresses_to_half_the_macs_slow(name: str, tmp_path: Path) -> None:
    _check(name, tmp_path)
