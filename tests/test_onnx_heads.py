"""Attention heads of a transformer exported to ONNX: found in the converted graph, removed with the
same result as removing them from the Hugging Face model itself, exported again with every input dynamic;
a layout whose "heads" are not contiguous blocks of channels is left whole."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from core.export.artifacts import export_onnx
from core.graph.attention import find_sites
from core.inputs import Inputs
from core.intake.onnx_io import load_onnx
from core.surgery.heads import remove_heads

transformers = pytest.importorskip("transformers")

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
REMOVED = {0: [0, 2], 1: [1]}  # layer -> heads


def _bert(implementation: str) -> nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                     attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # padding, so the mask takes part
    return {"input_ids": torch.randint(0, 50, (batch, length), generator=generator), "attention_mask": mask,
            "token_type_ids": torch.randint(0, 2, (batch, length), generator=generator)}


def _export(model: nn.Module, path: Path, dynamo: bool) -> None:
    """As torch.onnx exports it: TorchScript-based at opset 17, or dynamo-based (opset 20, Reshape with
    allowzero, Gelu as one op)."""
    example = tuple(_tokens(2, 6, seed=0).values())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(model, example, str(path), dynamo=True, input_names=NAMES, output_names=["logits"],
                              dynamic_shapes=tuple({0: batch, 1: sequence} for _ in NAMES))
        else:
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17, input_names=NAMES,
                              output_names=["logits"],
                              dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in NAMES},
                                            "logits": {0: "batch"}})


@pytest.mark.parametrize(("implementation", "dynamo"), [("eager", False), ("sdpa", False), ("eager", True)])
def test_exported_heads_are_removed_as_hugging_face_removes_them(implementation, dynamo, tmp_path):
    original = _bert(implementation)
    _export(original, tmp_path / "bert.onnx", dynamo)
    converted = load_onnx(tmp_path / "bert.onnx")
    module = converted.module
    sites, unrecognised = find_sites(module)
    assert [(site.num_heads(module), site.head_dim) for site in sites] == [(4, 8), (4, 8)] and not unrecognised
    assert any("2 attention module(s) of the ONNX graph can lose whole heads" in note for note in converted.notes)

    for layer, site in enumerate(sites):
        remove_heads(module, site, REMOVED[layer])
    for layer, site in enumerate(find_sites(original)[0]):
        remove_heads(original, site, REMOVED[layer])
    assert [site.num_heads(module) for site in find_sites(module)[0]] == [2, 3]
    for batch, length in ((1, 5), (4, 11)):
        tokens = _tokens(batch, length, seed=batch)
        with torch.no_grad():
            expected = original(**tokens).logits
            got = converted.bind(Inputs(tokens)).call(module)
        assert torch.allclose(got, expected, atol=1e-5)

    export_onnx(module, converted.bind(Inputs(_tokens(2, 6, seed=3))), tmp_path / "pruned.onnx", converted.spec)
    session = ort.InferenceSession(str(tmp_path / "pruned.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == \
        [(i.name, i.shape) for i in ort.InferenceSession(str(tmp_path / "bert.onnx")).get_inputs()]
    tokens = _tokens(3, 9, seed=5)
    (logits,) = session.run(None, {name: tensor.numpy() for name, tensor in tokens.items()})
    with torch.no_grad():
        assert np.allclose(logits, original(**tokens).logits.numpy(), atol=1e-5)


class _DimensionMajorAttention(nn.Module):
    """Self-attention whose channels are laid out dimension-major (channel d·H + h is dimension d of
    head h): a whole head is not a block of consecutive channels, so it cannot lose heads by blocks."""

    def __init__(self, width: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.heads = heads
        self.classifier = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (-1, self.heads)).permute(0, 3, 1, 2)

        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / 2.0
        context = scores.softmax(-1) @ split(self.v(x))
        return self.classifier(self.out(context.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[1], -1)).mean(1))


def test_heads_that_are_not_blocks_of_channels_are_left_whole(tmp_path):
    torch.manual_seed(0)
    model = _DimensionMajorAttention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 5, 24),), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    converted = load_onnx(tmp_path / "m.onnx")
    assert find_sites(converted.module)[0] == []
    assert any("keep all their heads" in note for note in converted.notes), converted.notes
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        assert torch.allclose(converted.module(x), model(x), atol=1e-5)


def test_dynamo_exported_sdpa_attention_keeps_its_heads_and_still_converts(tmp_path):
    """The dynamo exporter writes SDPA with the key folded into batch × heads; that fold cannot be made
    independent of the head count, so the heads stay and the model is converted as it is."""
    original = _bert("sdpa")
    _export(original, tmp_path / "bert.onnx", dynamo=True)
    converted = load_onnx(tmp_path / "bert.onnx")
    assert find_sites(converted.module)[0] == []
    assert any("2 attention module(s) of the ONNX graph keep all their heads" in note for note in converted.notes)
    tokens = _tokens(3, 7, seed=1)
    with torch.no_grad():
        got = converted.bind(Inputs(tokens)).call(converted.module)
        assert torch.allclose(got, original(**tokens).logits, atol=1e-5)
