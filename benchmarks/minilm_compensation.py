"""How well a pruned layer's consumer makes up for the removed units, on snippets it never saw.

For MiniLM fine-tuned on Rotten Tomatoes (the cached model of `minilm_rotten_tomatoes`), each
chosen layer's MLP down projection and attention output projection lose a share of their inputs
(the lowest-variance neurons, or whole heads); the consumer is compensated from statistics of
calibration snippets (fine-tuning data, as `compress` sees it) and its output error is measured
on unseen snippets, relative to the output's variance:

- `none`: the inputs are dropped;
- `mean`: their calibration mean is folded into the bias (`least_squares_compensation=False`);
- `ridge=R`: least squares from the kept inputs, with ridge R relative to their mean variance
  (core uses `core.surgery.compensation.RIDGE`).

```
.venv/bin/python -m benchmarks.minilm_compensation
```
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks import minilm
from benchmarks.minilm_rotten_tomatoes import CACHE_DIR, Settings
from core.importance.statistics import InputMoments, InputStats, real_tokens, token_rows
from core.inputs import Inputs
from core.intake.hf import TextClassifier
from core.surgery import compensation
from core.surgery.compensation import compensate

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HEAD_DIM = 32


def consumer_inputs(model: TextClassifier, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer`'s input vectors at the real tokens of `x`."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            for batch in x.split(64):
                model(batch)
                rows, real = token_rows(seen[-1], real_tokens(model, Inputs({"input_ids": batch})))
                seen[-1] = rows if real is None else rows[real.bool()]
    finally:
        handle.remove()
    return torch.cat(seen)


def removed_inputs(layer: nn.Linear, calib: torch.Tensor, share: float, heads: bool) -> list[int]:
    """The inputs whose calibration variance, weighted by their column's norm, is lowest (whole
    heads for an attention output)."""
    weight = (calib - calib.mean(0)).pow(2).mean(0) * layer.weight.detach().pow(2).sum(0)
    if not heads:
        return weight.argsort()[: int(share * len(weight))].tolist()
    per_head = weight.view(-1, HEAD_DIM).sum(1)
    chosen = per_head.argsort()[: int(share * len(per_head))].tolist()
    return [h * HEAD_DIM + i for h in chosen for i in range(HEAD_DIM)]


def relative_error(layer: nn.Linear, removed: list[int], stats: InputStats | None, unseen: torch.Tensor) -> float:
    with torch.no_grad():
        reference = layer(unseen)
        pruned = copy.deepcopy(layer)
        if stats is not None:
            compensate(pruned, removed, stats)
        pruned.weight[:, removed] = 0  # what removing the input columns does to the output
        error = (pruned(unseen) - reference).pow(2).mean()
        return float(error / (reference - reference.mean(0)).pow(2).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="0,3,5", help="encoder layers, comma-separated (default: 0,3,5)")
    p.add_argument("--shares", default="0.5,0.875", help="shares of inputs removed (default: 0.5,0.875)")
    p.add_argument("--samples", type=int, default=512, help="calibration and unseen snippets each (default: 512)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if (missing := minilm.missing_packages()) is not None:
        print(missing, file=sys.stderr)
        return 2
    settings = Settings()
    from core.intake.model_io import open_model
    from core.intake.text_data import tokenize
    from core.options import IntakeOptions

    archive = minilm.finetuned_minilm(CACHE_DIR, settings.n_train, n_eval=settings.n_eval,
                                      log=lambda line: print(line, file=sys.stderr))
    intake = IntakeOptions(max_length=64)
    loaded = open_model(Path(archive), intake)
    model = loaded.module.eval()
    (train_texts, _), (eval_texts, _) = minilm.split(settings.n_train, settings.n_eval, settings.seed)

    def ids(texts: list[str]) -> torch.Tensor:
        records = [{"text": text} for text in texts[: args.samples]]
        return tokenize(records, loaded.tokenizer, "text", "label", intake.max_length, None).inputs.tensors["input_ids"]

    calib_ids, unseen_ids = ids(train_texts), ids(eval_texts)
    methods = ["none", "mean", *(f"ridge={r:g}" for r in RIDGES)]
    print("| Layer | Consumer | Removed | " + " | ".join(methods) + " |")
    print("|---" * (3 + len(methods)) + "|")
    for index in (int(i) for i in args.layers.split(",")):
        for part, heads in (("output.dense", False), ("attention.output.dense", True)):
            layer = model.get_submodule(f"model.bert.encoder.layer.{index}.{part}")
            calib, unseen = consumer_inputs(model, calib_ids, layer), consumer_inputs(model, unseen_ids, layer)
            moments = InputMoments(with_cov=True)
            moments.add(calib)
            stats = moments.stats()
            for share in (float(s) for s in args.shares.split(",")):
                removed = removed_inputs(layer, calib, share, heads)
                errors = [relative_error(layer, removed, None, unseen),
                          relative_error(layer, removed, InputStats(stats.mean), unseen)]
                default = compensation.RIDGE
                try:
                    for ridge in RIDGES:
                        compensation.RIDGE = ridge
                        errors.append(relative_error(layer, removed, stats, unseen))
                finally:
                    compensation.RIDGE = default
                what = f"{share:.0%} of {'heads' if heads else 'neurons'}"
                print(f"| {index} | {part} | {what} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
