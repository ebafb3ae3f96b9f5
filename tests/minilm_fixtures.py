"""MiniLM fine-tuned on a small Rotten Tomatoes subset, as the files a user uploads.

Opt in with `pytest_plugins = ["tests.minilm_fixtures"]`: the session fixture fine-tunes a 22 M
parameter model (about a minute on one core, then cached), so only the tests that need it pull it in.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from benchmarks import minilm

REPO = Path(__file__).resolve().parents[1]
# tests/artifacts/ is git-ignored; the zip is named by its fine-tuning config, so later sessions
# (and the other xdist worker) reuse it instead of fine-tuning again
CACHE_DIR = REPO / "tests" / "artifacts" / "cache" / "minilm"

# 600 snippets for 2 epochs reach ~0.75 on held-out snippets in ~50 s on one core. The split puts
# N_EVAL snippets before the train ones; the eval file also takes the N_UNSEEN_AFTER that follow
# them: 2400 unseen snippets put the standard error of a top-1 difference near one point.
N_TRAIN, N_EVAL, N_UNSEEN_AFTER, EPOCHS, MAX_LENGTH, SEED = 600, 400, 2000, 2, 64, 0


class MiniLMFiles(NamedTuple):
    model_zip: Path
    train_jsonl: Path
    eval_jsonl: Path
    n_train: int
    n_eval: int
    max_length: int


@pytest.fixture(scope="session")
def minilm_files(tmp_path_factory: pytest.TempPathFactory) -> MiniLMFiles:
    """The model zip and the .jsonl files; the model was fine-tuned on exactly the train file."""
    reason = minilm.missing_packages()
    if reason:
        pytest.skip(reason)
    (train_texts, train_labels), (eval_texts, eval_labels) = minilm.split(N_TRAIN, N_EVAL, SEED)
    texts, labels = minilm.rotten_tomatoes(N_EVAL + N_TRAIN + N_UNSEEN_AFTER, SEED)
    eval_texts += texts[N_EVAL + N_TRAIN:]
    eval_labels += labels[N_EVAL + N_TRAIN:]
    model_zip = minilm.finetuned_minilm(CACHE_DIR, N_TRAIN, epochs=EPOCHS, max_length=MAX_LENGTH, seed=SEED,
                                        n_eval=N_EVAL)
    folder = tmp_path_factory.mktemp("minilm")
    return MiniLMFiles(model_zip, minilm.write_jsonl(folder / "train.jsonl", train_texts, train_labels),
                       minilm.write_jsonl(folder / "eval.jsonl", eval_texts, eval_labels), N_TRAIN, len(eval_texts),
                       MAX_LENGTH)
