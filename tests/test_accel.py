"""The accelerator paths (core.accel): bf16 recovery, channels_last, data kept on the device. CUDA is not
needed: autocast runs on the CPU too, and the layout decision is taken for a device object."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.accel import channels_last, resolve_precision, uses_channels_last
from core.data import Dataset, device_batches
from core.errors import OptionsError
from core.inputs import Inputs
from core.options import CompressOptions, Precision, Target
from core.progress import Reporter
from core.recovery.distill import recover
from core.run.pipeline import compress
from core.tasks.classification import Classification

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _recover(student: nn.Module, teacher: nn.Module, x: torch.Tensor, precision: Precision) -> None:
    recover(student, teacher, Dataset(Inputs.single(x), None), [], 3, device=CPU, batch_size=32, lr=1e-3,
            weight_decay=1e-4, temperature=3.0, kd_weight=1.0, feature_weight=0.0, seed=0,
            reporter=Reporter(None, None), task=Classification(), precision=precision)


@pytest.mark.parametrize(("precision", "autocast", "dtype"),
                         [(Precision.BF16, True, torch.bfloat16), (Precision.FP32, False, torch.float32)])
def test_recovery_runs_its_forward_passes_in_the_precision_asked_for(
        digits_model: nn.Module, digits_arrays: tuple[np.ndarray, np.ndarray], precision: Precision, autocast: bool,
        dtype: torch.dtype) -> None:
    student = copy.deepcopy(digits_model)
    seen: list[tuple[bool, torch.dtype]] = []
    linear = next(m for m in student.modules() if isinstance(m, nn.Linear))
    linear.register_forward_hook(lambda _m, _i, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    _recover(student, digits_model, torch.from_numpy(digits_arrays[0][:64]), precision)
    assert seen and set(seen) == {(autocast, dtype)}
    # the master weights stay float32
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_auto_precision_is_bf16_on_cuda_with_bf16_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision(Precision.AUTO, CPU) == Precision.FP32
    assert resolve_precision(Precision.BF16, CPU) == Precision.BF16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(Precision.AUTO, CUDA) == Precision.BF16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(Precision.AUTO, CUDA) == Precision.FP32
    assert resolve_precision(Precision.FP32, CUDA) == Precision.FP32


def test_an_unknown_precision_is_refused() -> None:
    assert CompressOptions(precision="bf16").precision is Precision.BF16  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="precision"):
        CompressOptions(precision="fp8").validate()  # type: ignore[arg-type]


# slow: a CPU without bf16 instructions emulates it (7.7 minutes here, a sixth of the suite's CPU time); the
# precision's plumbing is tested above, this is its quality end to end
@pytest.mark.slow
def test_the_digits_example_compresses_within_its_budget_in_bf16(
        digits_model: nn.Module, digits_arrays: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x, y = digits_arrays
    options = CompressOptions(precision=Precision.BF16, recovery_iterations=80, final_recovery_iterations=120,
                              latency_runs=1, stages=("filters",))  # type: ignore[arg-type]
    result = compress(digits_model, Dataset(Inputs.single(torch.from_numpy(x)), torch.from_numpy(y)),
                      Target(macs_reduction=0.5, max_accuracy_drop=0.01), options, tmp_path)
    report = result.report
    assert report.options.precision is Precision.BF16
    assert report.target_met and report.accuracy_before - report.accuracy_after <= 0.01


def test_the_report_says_which_precision_auto_chose_on_a_cpu(
        digits_model: nn.Module, digits_arrays: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x, y = digits_arrays
    options = CompressOptions(recovery_iterations=5, final_recovery_iterations=5, latency_runs=1, max_steps=1,
                              stages=("filters",))  # type: ignore[arg-type]
    result = compress(digits_model, Dataset(Inputs.single(torch.from_numpy(x)), torch.from_numpy(y)),
                      Target(macs_reduction=0.1, max_accuracy_drop=1.0), options, tmp_path)
    assert result.report.options.precision is Precision.FP32


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 16, 4, stride=4)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.patches(x).flatten(2).transpose(1, 2))


def test_channels_last_is_for_conv_nets_on_cuda_only(digits_model: nn.Module) -> None:
    images = Inputs.single(torch.zeros(2, 1, 8, 8))
    assert uses_channels_last(digits_model, images, CUDA)
    assert not uses_channels_last(digits_model, images, CPU)
    assert not uses_channels_last(_Transformer(), Inputs.single(torch.zeros(2, 3, 16, 16)), CUDA)
    assert not uses_channels_last(nn.Sequential(nn.Conv1d(2, 4, 3)), Inputs.single(torch.zeros(2, 2, 9)), CUDA)
    converted = channels_last(Inputs({"x": torch.zeros(2, 3, 4, 4), "mask": torch.ones(2, 5, dtype=torch.long)}))
    assert converted.tensors["x"].is_contiguous(memory_format=torch.channels_last)
    assert converted.tensors["mask"].dtype == torch.long


def test_device_batches_are_the_batches_whether_resident_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = Inputs.single(torch.arange(10.0)[:, None])
    resident = [b.first for b in device_batches(inputs, CPU, 4)]
    monkeypatch.setattr("core.data.RESIDENT_BYTES", 0)
    streamed = [b.first for b in device_batches(inputs, CPU, 4)]
    assert [len(b) for b in resident] == [4, 4, 2]
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed, strict=True))
