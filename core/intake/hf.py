"""Hugging Face models from a model directory: built from the library's own classes (never
`trust_remote_code`), weights from safetensors only (a .bin file is a pickle).

Three kinds load, each behind a wrapper with plain tensor inputs (what the ONNX export keeps): a sequence
or image classifier (logits), a causal language model (next-token logits), and a bare text encoder (the
class AutoModel builds for the config's model type, e.g. BertModel, as sentence-transformers ships it),
whose output is its sentence embedding."""

from __future__ import annotations

import copy
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.errors import InputFileError, first_line
from core.export.spec import OnnxSpec
from core.graph.attention import find_sites
from core.graph.blocks import SkippedLayer
from core.graph.outputs import named_outputs
from core.inputs import Inputs
from core.intake.loaded import LoadedModel
from core.intake.text_data import token_windows

if TYPE_CHECKING:  # imported when a directory is loaded, after HF_HUB_OFFLINE is set
    from transformers import PreTrainedModel

_CLASSIFIERS = ("ForSequenceClassification", "ForImageClassification")
_CAUSAL_LMS = ("ForCausalLM", "LMHeadModel")
_DIR_HINT = "Zip the directory written by model.save_pretrained(dir, safe_serialization=True) (and the tokenizer's)."
# The output name of a TextEncoder: sentence-transformers' own, which core.tasks.embedding reads first.
SENTENCE_EMBEDDING = "sentence_embedding"


def _text_kwargs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                 pad_token_id: int) -> dict[str, torch.Tensor]:
    mask = (input_ids != pad_token_id).long() if attention_mask is None else attention_mask
    # passed only when given: not every architecture takes token types
    types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    return {"input_ids": input_ids, "attention_mask": mask, **types}


class TextClassifier(nn.Module):
    """Token ids, and the attention mask and token types the tokenizer made, in; logits out.
    Without a mask (token ids alone in an .npz) it is derived from the padding token."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(**_text_kwargs(input_ids, attention_mask, token_type_ids, self.pad_token_id)).logits


class TextEncoder(nn.Module):
    """A bare text encoder as a sentence embedder: the inputs of a TextClassifier in, and
    {"sentence_embedding": N×hidden} out, the last hidden states averaged over the attention mask.

    Mean pooling is what all-MiniLM and most sentence-transformers models were trained with (BERT's
    pooler_output was trained for next-sentence prediction, not similarity). The embedding is not
    normalised: cosine similarity, what embeddings are compared by, does not need it."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        inputs = _text_kwargs(input_ids, attention_mask, token_type_ids, self.pad_token_id)
        states = self.model(**inputs).last_hidden_state
        weights = inputs["attention_mask"].to(states.dtype).unsqueeze(-1)
        # clamped as sentence-transformers does, for a row that is all padding
        return {SENTENCE_EMBEDDING: (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)}


class CausalLanguageModel(nn.Module):
    """Token ids and an attention mask (text data makes both: core.intake.text_data.token_windows) in;
    next-token logits N×tokens×vocab out, without the key/value cache (an output of its own that pruning
    and the export have no use for).

    Without a mask (token ids alone in an .npz) every token is attended, not derived from a padding token:
    perplexity (core.tasks.language) counts every position then too."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class ImageClassifier(nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


_WRAPPERS = (TextClassifier, TextEncoder, CausalLanguageModel, ImageClassifier)


# Set on the nn.Linear that stands in for a transformers Conv1D (GPT-2's projections: x @ W + b, W stored
# inputs × outputs), which the dependency graph and the attention finder know how to prune. A plain Linear,
# not a subclass: torch-pruning's MAC counter looks layers up by their exact type.
FROM_CONV1D = "idap_from_conv1d"


def _swap_conv1d(model: nn.Module, to_linear: bool) -> None:
    """Every Conv1D of `model` as the Linear it computes (`to_linear`), or those Linears back as Conv1Ds,
    as from_pretrained builds the model (save_pretrained_zip)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        swapped: nn.Module
        if to_linear and isinstance(module, Conv1D):
            swapped = nn.Linear(module.nx, module.nf)
            swapped.weight.data, swapped.bias.data = module.weight.data.T.contiguous(), module.bias.data
            setattr(swapped, FROM_CONV1D, True)
        elif not to_linear and isinstance(module, nn.Linear) and getattr(module, FROM_CONV1D, False):
            swapped = Conv1D(module.out_features, module.in_features)
            swapped.weight.data = module.weight.data.T.contiguous()
            if module.bias is not None:
                swapped.bias.data = module.bias.data
        else:
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, swapped)


# config.json is read before anything is unpacked; a real one is a few kB
CONFIG_MAX_BYTES = 1 << 20
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


def weights_missing() -> InputFileError:
    return InputFileError("The Hugging Face directory has no model.safetensors.",
                          hint="Save with safe_serialization=True; pytorch_model.bin is a pickle and is not loaded.",
                          code="hf_weights_missing")


def check_config_json(raw: bytes) -> None:
    """What config.json alone tells, before a zipped directory is unpacked: it is a JSON object
    that names a classifier, a causal language model or a bare text encoder built into transformers."""
    try:
        config = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        raise InputFileError(f"config.json is not valid JSON: {first_line(exc)}", hint=_DIR_HINT,
                             code="invalid_hf_model") from exc
    names = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(names or [], list):
        raise InputFileError("config.json is not a Hugging Face config (an object with an architectures list).",
                             hint=_DIR_HINT, code="invalid_hf_model")
    _model_class([str(name) for name in names or []], config, _transformers())


def load_hf_directory(root: Path) -> LoadedModel:
    """A `LoadedModel` for the model saved in `root`, in its wrapper (see the module's docstring)."""
    transformers = _transformers()
    config = _config(root, transformers)
    model_class = _model_class(list(getattr(config, "architectures", None) or []), config.to_dict(), transformers)
    if not any((root / name).is_file() for name in WEIGHTS_FILES):
        raise weights_missing()
    try:
        model = model_class.from_pretrained(root, local_files_only=True, trust_remote_code=False,
                                            use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputFileError(f"The Hugging Face weights do not load into {model_class.__name__}: "
                             f"{first_line(exc)}", hint=_DIR_HINT, code="weights_mismatch") from exc
    name = model_class.__name__
    if name.endswith("ForImageClassification"):
        return _image_classifier(model, config)
    tokenizer = _tokenizer(root, transformers)
    if name.endswith(_CAUSAL_LMS):
        _swap_conv1d(model, to_linear=True)
        example = token_windows(["a short example of text, and another one"] * 4, tokenizer, 8)[:2]
        return LoadedModel(CausalLanguageModel(model), "hf", example=example, tokenizer=tokenizer, text_windows=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = tokenizer(["a short example", "another"], padding="max_length", max_length=16, truncation=True)
    # the export's interface follows the data's inputs (OnnxSpec.of): every array the tokenizer makes
    example = Inputs({key: torch.tensor(values, dtype=torch.int64) for key, values in encoded.items()})
    if name.endswith("ForSequenceClassification"):
        labels = [config.id2label[i] for i in range(config.num_labels)] if getattr(config, "id2label", None) \
            else None
        return LoadedModel(TextClassifier(model, pad), "hf", example=example, tokenizer=tokenizer, label_names=labels)
    return LoadedModel(TextEncoder(model, pad), "hf", example=example, tokenizer=tokenizer)


def _image_classifier(model: PreTrainedModel, config: Any) -> LoadedModel:
    labels = [config.id2label[i] for i in range(config.num_labels)] if getattr(config, "id2label", None) else None
    side = int(getattr(config, "image_size", 224))
    channels = int(getattr(config, "num_channels", 3))
    spec = OnnxSpec(input_names=["pixel_values"], output_names=["logits"],
                    dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                    input_dtypes={"pixel_values": "float32"})
    return LoadedModel(ImageClassifier(model), "hf", example=Inputs.single(torch.rand(2, channels, side, side)),
                       onnx_spec=spec, label_names=labels)


def _config(root: Path, transformers: Any) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise InputFileError(f"config.json is not a usable Hugging Face config: {first_line(exc)}",
                             hint=_DIR_HINT, code="invalid_hf_model") from exc


def _is_text_encoder(name: str, config: dict[str, Any]) -> bool:
    """Whether `name` is the bare model AutoModel builds for the config's model type, of a text model
    (one with a vocabulary) that is not an encoder-decoder (whose forward also needs decoder inputs)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    base = MODEL_MAPPING_NAMES.get(str(config.get("model_type")))
    bases = base if isinstance(base, (tuple, list)) else (base,)
    return name in bases and "vocab_size" in config and not config.get("is_encoder_decoder", False)


def _model_class(names: list[str], config: dict[str, Any], transformers: Any) -> Any:
    for name in names:
        if not isinstance(getattr(transformers, name, None), type):
            continue
        if name.endswith(_CLASSIFIERS + _CAUSAL_LMS) or _is_text_encoder(name, config):
            return getattr(transformers, name)
    raise InputFileError(
        f"Unsupported Hugging Face architecture {', '.join(names) or '(none in config.json)'}: "
        "a sequence or image classifier, a causal language model or a bare text encoder built into transformers "
        "is needed.",
        hint="Save a *ForSequenceClassification, *ForImageClassification, *ForCausalLM or bare text model "
             "(e.g. BertModel); custom code is never run.",
        code="unsupported_hf_architecture")


def _tokenizer(root: Path, transformers: Any) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise InputFileError("The text model's tokenizer files are missing or unreadable.",
                             hint="Also save the tokenizer into the directory: tokenizer.save_pretrained(dir).",
                             code="hf_tokenizer_missing") from exc


def save_pretrained_zip(wrapper: nn.Module, tokenizer: Any, path: Path, example: Inputs) -> str | None:
    """Write the pruned model as a zipped save_pretrained directory (the upload format) when its
    config can describe it, after checking that from_pretrained rebuilds the same outputs.
    Returns None on success, or why the config cannot describe the pruned model."""
    if not isinstance(wrapper, _WRAPPERS):
        raise TypeError(f"save_pretrained_zip takes the wrapper of a Hugging Face model (load_hf_directory), "
                        f"not {type(wrapper).__name__}.")
    model = copy.deepcopy(wrapper.model).cpu().eval()
    _swap_conv1d(model, to_linear=False)
    reason = _describe_in_config(model)
    if reason is not None:
        return reason
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        try:
            reloaded = type(model).from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            return f"from_pretrained cannot rebuild the pruned model from its config: {first_line(exc)}"
        rebuilt = copy.deepcopy(wrapper).cpu().eval()
        rebuilt.model = reloaded
        with torch.no_grad():
            expected = named_outputs(example.call(wrapper.cpu().eval()))
            got = named_outputs(example.call(rebuilt))
        if got.keys() != expected.keys() or any(
                got[key].shape != value.shape or not torch.allclose(got[key], value, rtol=1e-3, atol=1e-4)
                for key, value in expected.items()):
            return "the model rebuilt from the config computes different outputs (a pruned width the config " \
                   "does not describe)"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(folder.iterdir()):
                archive.write(file, f"model/{file.name}")
    return None


# The first projection of every layer's MLP (BERT's, Llama's, GPT-2's Conv1D) and the config field of its width.
_MLP_WIDTHS = {"intermediate.dense": "intermediate_size", "mlp.up_proj": "intermediate_size", "mlp.c_fc": "n_inner"}


def _describe_in_config(model: PreTrainedModel) -> str | None:
    """Update `model.config` to the pruned shape, or say which pruned shape it cannot hold."""
    config = model.config
    for stack in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        skipped = [i for i, layer in enumerate(stack) if isinstance(layer, SkippedLayer)]
        for index in reversed(skipped):
            del stack[index]  # ModuleList renumbers the rest, as a config with fewer layers builds them
        if skipped:
            config.num_hidden_layers = len(stack)
    sites = find_sites(model)[0]
    heads = sorted({site.num_heads(model) for site in sites})
    if len(heads) > 1:
        return (f"layers kept different numbers of attention heads ({', '.join(map(str, heads))}); "
                "transformers configs hold one head count for all layers")
    mlp = [(field, int(getattr(m, "out_features", getattr(m, "nf", 0)))) for name, m in model.named_modules()
           for suffix, field in _MLP_WIDTHS.items() if name.endswith(suffix)]
    widths = sorted({width for _, width in mlp})
    if len(widths) > 1:
        return (f"layers kept different feed-forward widths ({', '.join(map(str, widths))}); "
                "transformers configs hold one intermediate_size for all layers")
    hidden = {model.get_submodule(site.out).out_features for site in sites}
    if sites:
        (hidden_size,) = hidden
        if heads[0] * sites[0].head_dim != hidden_size:
            return (f"{heads[0]} heads of size {sites[0].head_dim} with a hidden size of {hidden_size}: the config "
                    "derives the head size as hidden_size / num_attention_heads")
        config.hidden_size, config.num_attention_heads = hidden_size, heads[0]
    if widths:
        setattr(config, mlp[0][0], widths[0])
    return None

