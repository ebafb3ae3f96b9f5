"""IDAP++ on a real pretrained transformer: MiniLM (6 layers) fine-tuned on Rotten Tomatoes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.minilm_rotten_tomatoes import encoder_params, onnx_top1
from core import CompressOptions, Target
from core.intake import compress_files, open_data
from core.model_io import open_model
from core.options import IntakeOptions

pytest_plugins = ["tests.minilm_fixtures"]

# Width of the residual stream stays: the word embeddings (half of MiniLM's parameters) are tied
# to it, and without this the size target would be met by shrinking the vocabulary table.
KEEP_HIDDEN = ("model.bert.embeddings.word_embeddings",)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 3 is open on this: on 600 snippets the 2-point budget stops "
                   "pruning at 6.5 % of the parameters (each further step costs 2-5 points on the 120 held-out "
                   "snippets); strict, so the day it passes the marker must go")
def test_forty_percent_of_the_encoder_within_two_points(minilm_files, tmp_path):
    intake = IntakeOptions(max_length=minilm_files.max_length)
    original = open_model(minilm_files.model_zip, intake)
    encoder_before = encoder_params(original.module)
    total_before = sum(p.numel() for p in original.module.parameters())
    goal = 0.4 * encoder_before / total_before  # 40 % of the encoder, as a share of the whole model
    options = CompressOptions(ignored_layers=KEEP_HIDDEN, recovery_iterations=20, final_recovery_iterations=150,
                              batch_size=32, seed=0)
    result = compress_files(minilm_files.model_zip, minilm_files.train_jsonl,
                            Target(params_reduction=goal, max_accuracy_drop=0.02), options, intake, tmp_path)
    report = result.report
    assert 1 - encoder_params(result.model) / encoder_before >= 0.37
    assert report["blocks"] and report["blocks"][0]["kind"] == "layer", "Stage 2 removed an encoder layer"
    held_out = open_data(minilm_files.eval_jsonl, original, intake)
    with torch.no_grad():
        before = float((original.module(held_out.x).argmax(1) == held_out.y).float().mean())
    after = onnx_top1(tmp_path / "model.onnx", held_out)
    assert before - after <= 0.02, (before, after)
