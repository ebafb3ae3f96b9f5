"""ONNX Runtime latency on a provider that this machine may lack: a note and CPU numbers, never a failure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.export.artifacts import export_onnx
from core.inputs import Inputs
from core.measure.latency import Provider, available_providers, open_session, ort_latency_ms


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu().mean((2, 3))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(_Tiny().eval(), Inputs.single(torch.randn(2, 3, 8, 8)), path)
    return path


@pytest.mark.parametrize("provider", [Provider.CUDA, Provider.TENSORRT])
def test_a_missing_gpu_provider_falls_back_to_the_cpu_with_a_note(tiny_onnx: Path, provider: Provider) -> None:
    if provider in available_providers():
        pytest.skip(f"{provider.ort_name} is installed here")
    session = open_session(tiny_onnx, provider)
    assert session.provider is Provider.CPU
    assert session.note is not None and provider.ort_name in session.note and "CPU" in session.note
    assert session.session.get_providers() == ["CPUExecutionProvider"]


def test_the_cpu_is_always_there_and_the_report_measures_on_it(tiny_onnx: Path) -> None:
    assert Provider.CPU in available_providers()
    session = open_session(tiny_onnx)
    assert (session.provider, session.note) == (Provider.CPU, None)
    latency = ort_latency_ms(tiny_onnx, Inputs.single(torch.randn(2, 3, 8, 8)), (1, 4), 2)
    assert set(latency) == {"batch_1", "batch_4"} and all(ms > 0 for ms in latency.values())
