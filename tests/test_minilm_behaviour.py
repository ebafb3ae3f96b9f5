"""IDAP++ on a real pretrained transformer: MiniLM (6 layers) fine-tuned on Rotten Tomatoes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.minilm_rotten_tomatoes import WORD_EMBEDDINGS, encoder_params, onnx_top1
from core.intake.files import compress_files, open_data
from core.intake.model_io import open_model
from core.options import CompressOptions, IntakeOptions, Stage, Target

pytest_plugins = ["tests.minilm_fixtures"]

# Width of the residual stream stays: the word embeddings (half of MiniLM's parameters) are tied
# to it, and without this the size target would be met by shrinking the vocabulary table.
KEEP_HIDDEN = (WORD_EMBEDDINGS,)


@pytest.mark.slow
@pytest.mark.parametrize("layers_must_beat_width", [True, False], ids=["default", "layers-unconditional"])
def test_forty_percent_of_the_encoder_within_two_points(minilm_files, tmp_path, layers_must_beat_width):
    """At a fixed size (-40 % of the encoder), accuracy on unseen snippets stays within 2 points.

    With the defaults, Stage 2 tries an encoder layer and keeps it only if it beats width pruning to
    the same size; allowed to remove layers unconditionally (the method's Stage 2), it removes one.

    The budget is off: the data given to compress is the model's own fine-tuning set, so its
    held-out split is memorised (the original scores ~0.87 there against ~0.75 on unseen
    snippets), and a per-step budget on it would measure forgetting, not accuracy. The budget's
    rollback is covered by the CNN pipeline tests.
    """
    intake = IntakeOptions(max_length=minilm_files.max_length)
    original = open_model(minilm_files.model_zip, intake)
    encoder_before = encoder_params(original.module)
    total_before = sum(p.numel() for p in original.module.parameters())
    goal = 0.4 * encoder_before / total_before  # 40 % of the encoder, as a share of the whole model
    options = CompressOptions(ignored_layers=KEEP_HIDDEN, recovery_iterations=20, final_recovery_iterations=150,
                              batch_size=32, seed=0, layers_must_beat_width=layers_must_beat_width)
    result = compress_files(minilm_files.model_zip, minilm_files.train_jsonl,
                            Target(params_reduction=goal, max_accuracy_drop=1.0), options, intake, tmp_path)
    report = result.report
    assert report.target_met
    assert 1 - encoder_params(result.model) / encoder_before >= 0.37
    tried = [step for step in report.steps if step.stage == Stage.LAYERS]
    assert tried and (tried[0].block or "").startswith("model.bert.encoder.layer."), "Stage 2 tried an encoder layer"
    if not layers_must_beat_width:
        assert report.blocks and report.blocks[0].kind == "layer", "Stage 2 removed an encoder layer"
    unseen = open_data(minilm_files.eval_jsonl, original, intake)
    with torch.no_grad():
        before = float((unseen.inputs.bind(original.module).call(original.module).argmax(1) == unseen.y).float().mean())
    after = onnx_top1(tmp_path / "model.onnx", unseen)
    assert before - after <= 0.02, (before, after)
