"""Hugging Face models beyond classifiers: a bare text encoder as a sentence embedder, and causal language
models, from the zipped directory through intake, the inferred task and compress to the exported files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.errors import InputFileError
from core.inputs import Inputs
from core.intake.files import compress_files, open_data
from core.intake.hf import SENTENCE_EMBEDDING, CausalLanguageModel, TextEncoder, check_config_json
from core.intake.model_io import open_model
from core.options import CompressOptions, IntakeOptions, Target
from core.tasks.kinds import Metric, Task
from tests.intake_fixtures import write_bert_zip, write_causal_lm_zip, write_review_jsonl

FAST = CompressOptions(recovery_iterations=1, final_recovery_iterations=1, latency_runs=1, batch_size=16,
                       max_steps=3)


@pytest.fixture(scope="module")
def encoder_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert_zip(tmp_path_factory.mktemp("encoder"), encoder_only=True)


def _encoded(tokenizer: object, texts: list[str], **padding: object) -> Inputs:
    encoded = tokenizer(texts, **padding)  # type: ignore[operator]
    return Inputs({name: torch.tensor(values) for name, values in encoded.items()})


def test_bare_encoder_embeds_a_sentence_by_its_real_tokens_only(encoder_zip):
    loaded = open_model(encoder_zip, IntakeOptions())
    assert isinstance(loaded.module, TextEncoder)
    texts = ["good film", "the plot was dull and the acting was awful"]
    padded = _encoded(loaded.tokenizer, texts, padding="max_length", max_length=16)
    alone = _encoded(loaded.tokenizer, texts[:1])
    with torch.no_grad():
        batch = padded.call(loaded.module)
        single = alone.call(loaded.module)
        states = loaded.module.model(**alone.tensors).last_hidden_state
    assert list(batch) == [SENTENCE_EMBEDDING] and batch[SENTENCE_EMBEDDING].shape == (2, 32)
    # padding changes nothing: the mean is over the tokens the attention mask keeps
    assert torch.allclose(batch[SENTENCE_EMBEDDING][:1], single[SENTENCE_EMBEDDING], atol=1e-5)
    assert torch.allclose(single[SENTENCE_EMBEDDING], states.mean(1), atol=1e-5)


@pytest.mark.parametrize(("config", "accepted"), [
    ({"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522}, True),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257}, True),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000}, True),
    # a bare model of another type than its config's, an image encoder, an encoder-decoder, a pre-training head
    ({"model_type": "gpt2", "architectures": ["BertModel"], "vocab_size": 30522}, False),
    ({"model_type": "vit", "architectures": ["ViTModel"]}, False),
    ({"model_type": "t5", "architectures": ["T5Model"], "vocab_size": 32128, "is_encoder_decoder": True}, False),
    ({"model_type": "bert", "architectures": ["BertForPreTraining"], "vocab_size": 30522}, False),
])
def test_config_names_a_loadable_kind_of_model(config, accepted):
    raw = json.dumps(config).encode()
    if accepted:
        check_config_json(raw)
    else:
        with pytest.raises(InputFileError) as caught:
            check_config_json(raw)
        assert caught.value.code == "unsupported_hf_architecture"


def test_text_for_a_causal_lm_is_windows_of_tokens_without_labels(tmp_path):
    loaded = open_model(write_causal_lm_zip(tmp_path), IntakeOptions())
    assert isinstance(loaded.module, CausalLanguageModel)
    texts = ["the film was good", "a dull plot", "great acting, short story"]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": i}) + "\n" for i, text in enumerate(texts)))
    data = open_data(path, loaded, IntakeOptions(max_length=8))
    eos = loaded.tokenizer.eos_token_id
    stream = [t for text in texts for t in [*loaded.tokenizer(text)["input_ids"], eos]]
    ids, mask = data.inputs.tensors["input_ids"], data.inputs.tensors["attention_mask"]
    assert data.y is None and data.inputs.names == ["input_ids", "attention_mask"]
    assert ids.shape == (len(stream) // 8, 8) and bool((mask == 1).all())
    assert ids.flatten().tolist() == stream[: len(stream) // 8 * 8]


def test_encoder_compressed_as_an_embedder_keeps_its_interface(encoder_zip, tmp_path):
    reviews = write_review_jsonl(tmp_path / "reviews.jsonl", n=64).read_text().splitlines()
    text = tmp_path / "unlabeled.jsonl"  # labels would be group ids, and the metric recall@10
    text.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in reviews))
    result = compress_files(encoder_zip, text, Target(params_reduction=0.2, max_accuracy_drop=1.0), FAST,
                            IntakeOptions(), tmp_path / "out")
    report = result.report
    assert report.task is Task.EMBEDDING and report.accuracy_metric is Metric.COSINE  # inferred
    assert report.accuracy_before == pytest.approx(1.0) and 0.0 < report.accuracy_after <= 1.0 + 1e-6
    assert report.params_reduction >= 0.17
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in session.get_outputs()] == [SENTENCE_EMBEDDING]
    ids = _encoded(open_model(encoder_zip, IntakeOptions()).tokenizer, ["good film", "the plot was dull"],
                   padding=True).bind(result.model)
    with torch.no_grad():
        expected = ids.call(result.model)[SENTENCE_EMBEDDING]
    (embedding,) = session.run(None, ids.numpy())
    assert embedding.shape == (2, 32) and np.allclose(embedding, expected.numpy(), atol=1e-4)
    if report.hf_pretrained is not None:  # when the config can describe the pruned widths, it reloads as one
        reloaded = open_model(tmp_path / "out" / "model_hf.zip", IntakeOptions())
        with torch.no_grad():
            assert torch.allclose(ids.call(reloaded.module)[SENTENCE_EMBEDDING], expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_compressed_with_perplexity(kind, tmp_path):
    text = write_review_jsonl(tmp_path / "reviews.jsonl", n=64)
    model_zip = write_causal_lm_zip(tmp_path, kind)
    result = compress_files(model_zip, text, Target(params_reduction=0.1, max_accuracy_drop=1.0), FAST,
                            IntakeOptions(max_length=16), tmp_path / "out")
    report = result.report
    assert report.task is Task.CAUSAL_LM and report.accuracy_metric is Metric.PERPLEXITY
    # an untrained model over a 257-token vocabulary is near uniform: perplexity near 257
    assert 100 < report.accuracy_before < 600 and report.accuracy_after > 1.0
    assert report.target_met and report.params_reduction >= 0.07  # MLP widths (GPT-2's Conv1Ds as Linears)
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    windows = open_data(text, open_model(model_zip, IntakeOptions()), IntakeOptions(max_length=16)).inputs[:3]
    with torch.no_grad():
        expected = windows.call(result.model)
    (logits,) = session.run(None, windows.numpy())
    assert logits.shape == (3, 16, 257) and np.allclose(logits, expected.numpy(), atol=1e-4)


def test_gpt2_conv1d_prunes_as_linear_and_saves_back_as_conv1d(tmp_path):
    import transformers

    from core.intake.hf import FROM_CONV1D, save_pretrained_zip

    model_zip = write_causal_lm_zip(tmp_path, "gpt2")
    loaded = open_model(model_zip, IntakeOptions())
    linears = [m for m in loaded.module.modules() if getattr(m, FROM_CONV1D, False)]
    assert len(linears) == 8 and all(type(m) is torch.nn.Linear for m in linears)  # 4 projections per layer
    original = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    ids = loaded.example
    with torch.no_grad():
        expected = original(**ids.tensors).logits
        assert torch.allclose(ids.call(loaded.module), expected, atol=1e-5)
    assert save_pretrained_zip(loaded.module, loaded.tokenizer, tmp_path / "saved.zip", ids) is None
    reloaded = open_model(tmp_path / "saved.zip", IntakeOptions())
    with torch.no_grad():
        assert torch.allclose(ids.call(reloaded.module), expected, atol=1e-5)
