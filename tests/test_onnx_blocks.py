"""Stage 2 on a converted ONNX graph: residual blocks are found in the flat graph, scored, removed, and
the pruned model still exports and runs in ONNX Runtime."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from core.data import Dataset
from core.graph.blocks import Addition, find_blocks, remove_block
from core.importance.divergence import block_divergence
from core.inputs import Inputs
from core.intake.onnx_io import OnnxModel, load_onnx
from core.options import CompressOptions, Stage, Target
from core.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from core.run.pipeline import compress


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class Net(nn.Module):
    """Three residual blocks, two of them inside a residual stage, and a sum of two parallel paths."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stage = nn.Sequential(Residual(width), Residual(width))
        self.left = nn.Conv2d(width, width, 3, padding=1)
        self.right = nn.Conv2d(width, width, 1)
        self.last = Residual(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.stage(x)  # nested: the stage's branch holds the two blocks' additions
        x = self.left(x) + self.right(x)  # neither path is the other's input: not a residual
        x = self.last(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture
def converted(tmp_path: Path) -> tuple[OnnxModel, Path]:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # the last block's branch outputs zero: removing it changes nothing
        net.last.body[4].weight.zero_()
        net.last.body[4].bias.zero_()
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["scores"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "scores": {0: "batch"}})
    return load_onnx(path), path


def _x(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_the_innermost_residual_additions_are_the_blocks(converted) -> None:
    loaded, _ = converted
    module = loaded.module
    additions = [name for name, m in module.named_modules() if isinstance(m, Addition)]
    assert len(additions) == 5  # the three blocks', the stage's and the parallel paths'
    blocks = find_blocks(module, loaded.bind(Inputs.single(_x(2))))
    assert len(blocks) == 3
    assert all(b.kind == "identity" and b.skip is not None for b in blocks)


def test_the_block_that_adds_nothing_scores_zero_and_goes_without_a_trace(converted) -> None:
    loaded, _ = converted
    module, x = loaded.module, _x(8)
    blocks = find_blocks(module, loaded.bind(Inputs.single(x[:2])))
    scores = block_divergence(module, blocks, loaded.bind(Inputs.single(x)), torch.device("cpu"), 4)
    last = blocks[-1].name
    assert scores[last] < 1e-6 < min(v for k, v in scores.items() if k != last)

    params = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        before = module(x)
        remove_block(module, blocks[-1])
        after = module(x)
    torch.testing.assert_close(after, before)
    width = 16  # the export folds each BatchNorm into its convolution: two convolutions go
    assert params - sum(p.numel() for p in module.parameters()) == 2 * (9 * width * width + width)
    assert [b.name for b in find_blocks(module, loaded.bind(Inputs.single(x[:2])))] == [b.name for b in blocks[:2]]


def test_stage_two_runs_on_a_converted_graph_and_the_export_matches(converted, tmp_path: Path) -> None:
    loaded, path = converted
    x = _x(32)
    with torch.no_grad():
        labels = loaded.module(x).argmax(1)
    options = CompressOptions(stages=(Stage.LAYERS,), recovery_iterations=1, final_recovery_iterations=1,
                              batch_size=8, calibration_samples=16, latency_runs=1, latency_batch=2)
    target = Target(macs_reduction=0.25, max_accuracy_drop=1.0)
    result = compress(loaded.module, Dataset(loaded.bind(Inputs.single(x)), labels), target, options,
                      tmp_path / "out", onnx_spec=loaded.spec)
    report = result.report
    assert report.target_met and report.removed_blocks, report.message
    assert all(block.kind == "identity" for block in report.blocks)

    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in original.get_inputs()]
    with torch.no_grad():
        expected = result.model.eval()(x[:3]).numpy()
    (got,) = session.run(None, {"pixel_values": x[:3].numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_run_resumes_from_a_checkpoint_taken_after_a_removal(converted, tmp_path: Path) -> None:
    """The checkpoint holds the converted graph with its branch gone; the resumed run ends where the whole
    run ended."""
    loaded, _ = converted
    x = _x(32)
    with torch.no_grad():
        labels = loaded.module(x).argmax(1)
    data = Dataset(loaded.bind(Inputs.single(x)), labels)
    options = CompressOptions(stages=(Stage.LAYERS,), recovery_iterations=2, final_recovery_iterations=2,
                              batch_size=8, latency_runs=1, latency_batch=2)
    target = Target(macs_reduction=0.55, max_accuracy_drop=1.0)
    saved: list[Path] = []

    def keep(checkpoint: Checkpoint) -> None:
        saved.append(save_checkpoint(checkpoint, tmp_path / f"checkpoint-{len(saved)}.pt"))

    whole = compress(copy.deepcopy(loaded.module), data, target, options, tmp_path / "whole", checkpoint=keep,
                     onnx_spec=loaded.spec).report
    assert len(whole.removed_blocks) == 2 and len(saved) == 2, whole.message
    first = load_checkpoint(saved[0])
    resumed = compress(copy.deepcopy(loaded.module), data, target, options, tmp_path / "resumed", resume=first,
                       onnx_spec=loaded.spec).report
    assert resumed.resumed_at_step == first.steps
    assert resumed.removed_blocks == whole.removed_blocks
    assert (resumed.macs_after, resumed.params_after) == (whole.macs_after, whole.params_after)
