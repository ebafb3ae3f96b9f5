"""Small real inputs for intake tests: Hugging Face directory zips (a BERT classifier or bare encoder, GPT-2
and Llama causal language models) and image-folder zips."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "the a movie film good bad great awful plot acting fun dull short long story was is and but not".split()


def write_bert_zip(directory: Path, num_labels: int = 2, layers: int = 2, encoder_only: bool = False) -> Path:
    """A small BertForSequenceClassification (with `encoder_only`, a bare BertModel, as sentence-transformers
    ships an encoder) with its WordPiece tokenizer, zipped like a user would."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    folder = directory / "bert"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
        id2label={i: f"class{i}" for i in range(num_labels)}, label2id={f"class{i}": i for i in range(num_labels)},
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config) if encoder_only else transformers.BertForSequenceClassification(config)
    model.save_pretrained(folder)
    return _zipped(folder, directory / "bert.zip")


def write_causal_lm_zip(directory: Path, kind: str = "gpt2", layers: int = 2) -> Path:
    """A small GPT2LMHeadModel or LlamaForCausalLM with a byte-level GPT-2 tokenizer (one token per byte, no
    merges, <|endoftext|> as the end of text), zipped like a user would."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = directory / kind
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    eos = vocab["<|endoftext|>"] = len(vocab)
    transformers.GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=layers, n_head=4, bos_token_id=eos,
            eos_token_id=eos))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, bos_token_id=eos,
            eos_token_id=eos, pad_token_id=None))
    model.save_pretrained(folder)
    return _zipped(folder, directory / f"{kind}.zip")


def _zipped(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(folder.iterdir()):
            out.write(path, f"{folder.name}/{path.name}")
    return archive


def write_review_jsonl(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 10)))
        lines.append(json.dumps({"text": " ".join(words), "label": i % 2}))
    path.write_text("\n".join(lines) + "\n")
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_zip(path: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 8,
                    side: int = 24, root: str = "pets/") -> Path:
    """Class folders of PNGs whose colour depends on the class, so the labels mean something."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for c, name in enumerate(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 80, size=(side, side, 3), dtype=np.uint8)
                pixels[..., c % 3] += 150
                archive.writestr(f"{root}{name}/{i}.png", png_bytes(pixels))
    return path
