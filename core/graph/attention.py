"""Attention heads as prunable units (method §2): finding the attention modules whose heads can be
scored (core.importance.heads) and removed (core.surgery.heads).

A recognised attention module has separate query/key/value projections, an explicit head
count and head size, and one output projection that consumes the concatenated heads.
Hugging Face's BERT/ViT/RoBERTa-style self-attention is recognised as it is;
`nn.MultiheadAttention` used as self-attention is first swapped for `SelfAttention`, which
computes the same thing with an explicit head size (MultiheadAttention derives the head size
from the embedding size, so it cannot lose heads). Attention in a graph converted from ONNX is
grouped into a `GraphAttention` at intake (core.intake.onnx_attention). Anything else named like attention is
reported as not recognised, and only the widths around it are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from core.graph.outputs import named_outputs
from core.inputs import Inputs

_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"), ("q", "k", "v"))
_HEAD_COUNT = ("num_attention_heads", "num_heads", "n_heads")
_HEAD_SIZE = ("attention_head_size", "head_dim")
_KV_COUNT = ("num_key_value_heads", "num_kv_heads")
_KV_GROUPS = "num_key_value_groups"
_OUT_NAMES = ("out_proj", "o_proj", "out_lin")


class SelfAttention(nn.Module):
    """Batch-first self-attention with separate projections and an explicit head size.

    Called like nn.MultiheadAttention (query, key, value, ...) and returning (output, None);
    key and value are the query, as in the self-attention it replaces.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool, dropout: float,
                 batch_first: bool) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.q = nn.Linear(embed_dim, inner, bias=bias)
        self.k = nn.Linear(embed_dim, inner, bias=bias)
        self.v = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, bias, mha.dropout, mha.batch_first)
        with torch.no_grad():
            for i, proj in enumerate((new.q, new.k, new.v)):
                rows = slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
                proj.weight.copy_(mha.in_proj_weight[rows])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[rows])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device)

    def forward(self, query: torch.Tensor, *_args: object, **_kwargs: object) -> tuple[torch.Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length = x.shape[0], x.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


class GraphAttention(nn.Module):
    """The projections of one attention module found in a graph converted from ONNX, held together so
    that `find_sites` sees a site. The graph calls the projections itself and never this module; its
    reshapes into heads take the head count from the width (core.intake.onnx_attention), so removing
    whole heads needs only the projections cut."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, out_proj: nn.Linear, num_heads: int,
                 head_dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out_proj = q, k, v, out_proj
        self.num_heads = num_heads
        self.head_dim = head_dim


@dataclass(frozen=True)
class AttentionSite:
    """A recognised attention module. Its units are key-value heads: under grouped-query attention
    (`query_group` query heads share one key-value head) a unit is a whole key-value group, since
    removing a query head alone would break the query/key-value ratio the module repeats keys by."""

    name: str  # module holding the q/k/v projections
    qkv: tuple[str, str, str]  # their attribute names
    out: str  # full name of the output projection
    count_attr: str | None  # the module's query head count; None: the module derives it from the widths
    head_dim: int
    size_attr: str | None  # e.g. all_head_size, kept equal to heads × head size
    query_group: int = 1  # query heads per key-value head
    kv_count_attr: str | None = None  # the module's key-value head count, where it keeps one

    @property
    def unit_width(self) -> int:
        """Query (and output projection input) channels of one unit."""
        return self.query_group * self.head_dim

    def num_heads(self, model: nn.Module) -> int:
        """Units (key-value heads) the module has now."""
        return self.projections(model)[1].out_features // self.head_dim

    def projections(self, model: nn.Module) -> list[nn.Linear]:
        module = model.get_submodule(self.name)
        return [getattr(module, attr) for attr in self.qkv]

    def rows_per_unit(self) -> tuple[int, int, int]:
        """Output rows of one unit in the query, key and value projections."""
        return self.unit_width, self.head_dim, self.head_dim


def holds_attention(module: nn.Module) -> bool:
    """Whether `module` contains attention of any layout (recognised or not)."""
    return any("attention" in type(m).__name__.lower() or isinstance(m, nn.MultiheadAttention)
               for m in module.modules())


def _same_outputs(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    return got.keys() == reference.keys() and all(
        torch.allclose(got[name], reference[name], rtol=1e-4, atol=1e-5) for name in reference)


def convert_multihead_attention(model: nn.Module, example: Inputs) -> list[str]:
    """Swap each nn.MultiheadAttention for SelfAttention where the model's outputs stay the same
    (self-attention without masks); the others stay, their heads unpruned."""
    mhas = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not mhas:
        return []
    with torch.no_grad():
        reference = named_outputs(example.call(model.eval()))
    kept = []
    for name in mhas:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        if not original._qkv_same_embed_dim:
            kept.append(name)
            continue
        setattr(parent, child, SelfAttention.from_multihead(original))
        with torch.no_grad():
            same = _same_outputs(named_outputs(example.call(model)), reference)
        if not same:  # cross-attention or masks: the swap would change the model
            setattr(parent, child, original)
            kept.append(name)
    if kept:
        return [f"nn.MultiheadAttention used other than as plain self-attention ({', '.join(kept[:3])}"
                f"{' …' if len(kept) > 3 else ''}): its heads are not pruned."]
    return []


def find_sites(model: nn.Module) -> tuple[list[AttentionSite], list[str]]:
    """Recognised attention modules, and descriptions of attention modules that are not."""
    sites, unrecognised = [], []
    for name, module in model.named_modules():
        site, reason = _site(model, name, module)
        if site is not None:
            sites.append(site)
        elif reason is not None:
            unrecognised.append(f"{name} ({type(module).__name__}): {reason}")
    inside = [s.name for s in sites]
    # containers of a recognised module (BertAttention around BertSelfAttention) are not separate sites
    unrecognised = [u for u in unrecognised if not any(s.startswith(u.split(" ")[0] + ".") for s in inside)]
    return sites, unrecognised


def _site(model: nn.Module, name: str, module: nn.Module) -> tuple[AttentionSite | None, str | None]:
    looks_like_attention = "attention" in type(module).__name__.lower() or isinstance(module, nn.MultiheadAttention)
    qkv = next((names for names in _QKV_NAMES if all(isinstance(getattr(module, n, None), nn.Linear)
                                                      for n in names)), None)
    count_attr = next((a for a in _HEAD_COUNT if isinstance(getattr(module, a, None), int)), None)
    size = next((getattr(module, a) for a in _HEAD_SIZE if isinstance(getattr(module, a, None), int)), None)
    # Hugging Face's grouped-query modules (Llama, Mistral, Qwen2, ...) keep no head count: they view
    # the projections as (-1, head_dim) and repeat keys by num_key_value_groups
    groups = getattr(module, _KV_GROUPS, None)
    if qkv is None or size is None or (count_attr is None and not isinstance(groups, int)):
        return None, "no separate query/key/value projections with a head count and size" if \
            looks_like_attention and name and not isinstance(module, nn.MultiheadAttention) else None
    q, k, v = (getattr(module, n) for n in qkv)
    if count_attr is not None and q.out_features != getattr(module, count_attr) * size:
        return None, None
    if k.out_features != v.out_features or k.out_features % size or q.out_features % k.out_features:
        return None, "key and value projections that are not whole heads of the query's head size"
    query_group = q.out_features // k.out_features
    kv_count_attr = next((a for a in _KV_COUNT if getattr(module, a, None) == k.out_features // size), None)
    if isinstance(groups, int) and groups != query_group:
        return None, f"{_KV_GROUPS} {groups} does not match the projections' widths"
    if query_group > 1 and not isinstance(groups, int) and kv_count_attr is None:
        return None, ("grouped-query attention that keeps no key-value head count; "
                      "its heads are left alone to keep the head ratio valid")
    out = _output_projection(model, name, module, q.out_features)
    if out is None:
        return None, "no output projection consuming the heads was found"
    size_attr = "all_head_size" if getattr(module, "all_head_size", None) == q.out_features else None
    return AttentionSite(name, qkv, out, count_attr, size, size_attr, query_group, kv_count_attr), None


def _output_projection(model: nn.Module, name: str, module: nn.Module, width: int) -> str | None:
    for attr in _OUT_NAMES:
        out = getattr(module, attr, None)
        if isinstance(out, nn.Linear) and out.in_features == width:
            return f"{name}.{attr}"
    parent_name = name.rpartition(".")[0]
    # Hugging Face splits self-attention (q, k, v) and its output (`output.dense`) into siblings
    candidate = f"{parent_name}.output.dense" if parent_name else "output.dense"
    try:
        out = model.get_submodule(candidate)
    except AttributeError:
        return None
    return candidate if isinstance(out, nn.Linear) and out.in_features == width else None
