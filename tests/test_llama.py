"""Decoder-only transformers (Llama-style: RMSNorm, rotary embeddings, grouped-query attention, gated
MLP): key-value groups as the head unit, MLP width, whole decoder layers, and the KV-cache-free
forward exported to ONNX."""

from __future__ import annotations

import copy
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from core.export.artifacts import export_onnx, verify_onnx
from core.graph.attention import AttentionSite, find_sites
from core.graph.blocks import find_blocks, remove_block
from core.importance.heads import head_divergence
from core.inputs import Inputs
from core.surgery.apply import apply_plan
from core.surgery.groups import build_graph, prunable_groups
from core.surgery.heads import remove_heads
from core.surgery.units import UnitKey, UnitKind

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HEAD_DIM = 16
IMPLEMENTATIONS = ("eager", "sdpa")


def tiny_llama(attention: str = "eager", kv_heads: int = 2, layers: int = 4, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                                      max_position_embeddings=64, use_cache=False, attn_implementation=attention)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(batch: int, length: int, seed: int = 0) -> Inputs:
    """Token ids and a mask with right padding in the first sample."""
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return Inputs({"input_ids": ids, "attention_mask": mask})


def logits(model: nn.Module, x: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return x.call(model.eval()).logits


def silence(model: nn.Module, site: AttentionSite, group: int) -> None:
    """Key-value group `group` contributes nothing: its value rows and the output projection's columns
    of its query heads are zero."""
    v_proj = site.projections(model)[2]
    out = model.get_submodule(site.out)
    with torch.no_grad():
        v_proj.weight[group * HEAD_DIM : (group + 1) * HEAD_DIM] = 0
        out.weight[:, group * site.unit_width : (group + 1) * site.unit_width] = 0


def test_key_value_groups_are_the_head_units():
    sites, unrecognised = find_sites(tiny_llama())
    assert unrecognised == []
    assert [s.name for s in sites] == [f"model.layers.{i}.self_attn" for i in range(4)]
    site = sites[0]
    assert site.out == "model.layers.0.self_attn.o_proj" and site.head_dim == HEAD_DIM
    assert site.query_group == 2 and site.num_heads(tiny_llama()) == 2 and site.unit_width == 2 * HEAD_DIM
    plain = find_sites(tiny_llama(kv_heads=4))[0][0]  # no grouping: every head is its own key-value head
    assert plain.query_group == 1 and plain.num_heads(tiny_llama(kv_heads=4)) == 4


@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
@pytest.mark.parametrize("group", [0, 1])
def test_removing_a_key_value_group_equals_silencing_it(attention, group):
    model = tiny_llama(attention)
    site = find_sites(model)[0][1]
    silenced, removed = copy.deepcopy(model), copy.deepcopy(model)
    silence(silenced, site, group)
    remove_heads(removed, site, [group])
    attn = removed.get_submodule(site.name)
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features,
            attn.o_proj.in_features) == (2 * HEAD_DIM, HEAD_DIM, HEAD_DIM, 2 * HEAD_DIM)
    assert attn.head_dim == HEAD_DIM and attn.num_key_value_groups == 2  # rotary and the repeat stay as they were
    for batch, length in ((2, 12), (3, 7)):
        x = tokens(batch, length, seed=length)
        assert not torch.allclose(logits(silenced, x), logits(model, x), atol=1e-4), "the group matters"
        assert torch.allclose(logits(removed, x), logits(silenced, x), atol=1e-5)


def test_a_silenced_key_value_group_scores_zero():
    model = tiny_llama()
    sites = find_sites(model)[0]
    silence(model, sites[2], 1)
    scores = head_divergence(model, sites, tokens(4, 10), torch.device("cpu"), 4)
    assert all(s.shape == (2,) for s in scores.values())
    assert float(scores[sites[2].name][1]) == 0.0 and float(scores[sites[2].name][0]) > 0
    assert all(float(scores[s.name].min()) > 0 for s in sites if s is not sites[2])


def test_mlp_width_is_one_coupled_group_and_the_residual_stream_stays_whole():
    model = tiny_llama()
    x = tokens(2, 8)
    groups = prunable_groups(build_graph(model, x), model, [model.lm_head], {}, 0.125, 1)
    assert sorted(g.key.name for g in groups) == [f"model.layers.{i}.mlp.up_proj" for i in range(4)]
    assert all(g.width == 128 for g in groups)
    apply_plan(model, x, {groups[0].key: list(range(0, 128, 2))})
    mlp = model.get_submodule(groups[0].key.name.rpartition(".")[0])
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (64, 64, 64)
    assert logits(model, tokens(3, 5)).shape == (3, 5, 256)


def test_removing_a_decoder_layer_equals_a_model_built_without_it():
    import transformers

    model = tiny_llama()
    candidates = find_blocks(model, tokens(2, 8))
    assert [(c.name, c.layer) for c in candidates] == [(f"model.layers.{i}", True) for i in range(4)]
    remove_block(model, candidates[1])
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 3
    shorter = transformers.LlamaForCausalLM(config).eval()
    state = {name: value for name, value in model.state_dict().items() if ".layers.1." not in name}
    renumbered = {name.replace(".layers.2.", ".layers.1.").replace(".layers.3.", ".layers.2."): value
                  for name, value in state.items()}
    shorter.load_state_dict(renumbered)
    x = tokens(2, 9)
    assert torch.allclose(logits(model, x), logits(shorter, x), atol=1e-5)


@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
def test_pruned_decoder_exports_its_cache_free_forward_to_onnx(attention, tmp_path):
    model = tiny_llama(attention)
    example = tokens(2, 8)
    sites = find_sites(model)[0]
    graph = build_graph(model, example)
    mlp = prunable_groups(graph, model, [model.lm_head], {}, 0.125, 1)
    heads = {UnitKey(UnitKind.HEADS, sites[0].name): [0], UnitKey(UnitKind.HEADS, sites[3].name): [1]}
    apply_plan(model, example, heads | {mlp[1].key: list(range(40))})
    remove_block(model, find_blocks(model, example)[2])
    path = tmp_path / "model.onnx"
    export_onnx(model, example, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch, length in ((1, 5), (3, 11)):  # other batch and sequence sizes than the export's
        x = tokens(batch, length, seed=batch)
        (got,) = session.run(None, x.numpy())
        assert got.shape == (batch, length, 256)
        assert np.allclose(got, logits(model, x).numpy(), atol=1e-4)
    assert verify_onnx(model, path, tokens(3, 11)) < 1e-4


@pytest.mark.slow  # about 40 s on one shared core
def test_compress_prunes_a_decoder_as_a_causal_language_model(tmp_path):
    from core.data import Dataset
    from core.options import CompressOptions, Target
    from core.run.pipeline import compress
    from core.tasks.kinds import Metric, Task

    model = tiny_llama()
    # a learnable stream (the token ids count up by 1 or 3): recovery has a signal to follow
    steps = torch.randint(0, 2, (96, 16), generator=torch.Generator().manual_seed(0)) * 2 + 1
    ids = (torch.randint(0, 256, (96, 1), generator=torch.Generator().manual_seed(1)) + steps.cumsum(1)) % 256
    options = CompressOptions(task="causal-lm", recovery_iterations=2, final_recovery_iterations=2, latency_runs=1,
                              latency_batch=2, batch_size=16, max_steps=6, seed=0, calibration_samples=32)
    result = compress(model, Dataset(Inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})),
                      Target(params_reduction=0.3, max_accuracy_drop=1.0), options, tmp_path)
    report = result.report
    assert report.task is Task.CAUSAL_LM and report.accuracy_metric is Metric.PERPLEXITY
    assert report.target_met and report.params_reduction >= 0.27
    widths = {row.name: row.channels_after for row in report.layers}
    heads = {row.name: row.heads_after for row in report.attention_heads}
    # something narrower than it was: a key-value group, MLP neurons or a whole layer
    assert report.blocks or min(heads.values()) < 2 or min(
        width for name, width in widths.items() if name.endswith("up_proj")) < 128
    session = ort.InferenceSession(str(result.artifacts["model.onnx"]), providers=["CPUExecutionProvider"])
    x = tokens(2, 10, seed=3)
    (got,) = session.run(None, x.numpy())
    assert np.allclose(got, logits(result.model, x).numpy(), atol=1e-4)
