"""An ONNX upload with two named inputs (an image and a feature vector), trained on a task that needs
both: pruned through compress_files and the CLI, exported with both inputs as they were declared,
and data whose arrays do not match the ONNX inputs refused by those names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core import cli
from core.errors import UserError
from core.intake.files import compress_files, inspect_files
from core.options import CompressOptions, IntakeOptions, Target
from core.report import InputSignature
from tests.multi_input_models import ImageAndFeatures, fit

FAST = CompressOptions(recovery_iterations=20, final_recovery_iterations=60, latency_runs=1, batch_size=64, seed=0)
BUDGET = 0.03
NAMES = ["image", "features"]


def _task(n: int, seed: int) -> dict[str, np.ndarray]:
    """Four classes: which of two colour channels is brighter (the image) times the sign of the features' sum."""
    rng = np.random.default_rng(seed)
    image = rng.random((n, 3, 12, 12), dtype=np.float32)
    brighter = rng.integers(0, 2, n)
    image[np.arange(n), brighter] += 0.15
    features = rng.standard_normal((n, 6)).astype(np.float32)
    labels = 2 * brighter + (features.sum(1) > 0)
    return {"image": image, "features": features, "labels": labels.astype(np.int64)}


def _trained(steps: int = 300) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ImageAndFeatures()
    data = _task(4096, seed=1)
    labels = data.pop("labels")
    return fit(model, data, labels, steps)


@pytest.fixture(scope="module")
def upload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model.onnx exported by torch with both inputs named and a dynamic batch, data.npz by those names)."""
    directory = tmp_path_factory.mktemp("onnx-two")
    path = directory / "two.onnx"
    example = (torch.rand(1, 3, 12, 12), torch.randn(1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_trained(), example, str(path), dynamo=False, opset_version=17, input_names=NAMES,
                          output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}})
    data = directory / "data.npz"
    np.savez(data, **_task(768, seed=0))
    return path, data


def _accuracy(session: ort.InferenceSession, data: dict[str, np.ndarray], batch: int) -> float:
    predictions = [session.run(None, {name: data[name][i : i + batch] for name in NAMES})[0].argmax(1)
                   for i in range(0, len(data["labels"]), batch)]
    return float((np.concatenate(predictions) == data["labels"]).mean())


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_two_input_onnx_is_pruned_and_keeps_its_interface(upload, tmp_path):
    model, data = upload
    intake = IntakeOptions()
    without_data = inspect_files(model, None, None, FAST, intake)
    assert without_data.inputs == [InputSignature(name="image", dtype="float32", shape=[3, 12, 12]),
                                   InputSignature(name="features", dtype="float32", shape=[6])]

    result = compress_files(model, data, Target(params_reduction=0.3, max_accuracy_drop=BUDGET), FAST, intake,
                            tmp_path / "out")
    report = result.report
    assert report.target_met and report.params_reduction >= 0.25, report.message
    assert report.accuracy_before >= 0.9, "the task is learnt, so accuracy means something"

    original, pruned = _session(model), _session(result.artifacts["model.onnx"])
    assert [(i.name, i.type, i.shape) for i in pruned.get_inputs()] == \
        [(i.name, i.type, i.shape) for i in original.get_inputs()] == \
        [("image", "tensor(float)", ["batch", 3, 12, 12]), ("features", "tensor(float)", ["batch", 6])]
    assert [o.name for o in pruned.get_outputs()] == ["logits"]
    unseen = _task(1000, seed=2)
    before = _accuracy(original, unseen, 100)
    for batch in (1, 7):
        assert _accuracy(pruned, {k: v[:210] for k, v in unseen.items()}, batch) >= \
            _accuracy(original, {k: v[:210] for k, v in unseen.items()}, 100) - BUDGET - 1 / 210
    assert _accuracy(pruned, unseen, 100) >= before - BUDGET


def test_two_input_onnx_through_the_cli(upload, tmp_path, capsys):
    model, data = upload
    out = tmp_path / "result"
    code = cli.main(["prune", str(model), "--data", str(data), "--out", str(out), "--params-reduction", "0.3",
                     "--max-accuracy-drop", str(BUDGET), "--recovery-iterations", "20", "--final-recovery-epochs",
                     "5", "--batch-size", "64"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["target_met"] and report["params_reduction"] >= 0.25
    unseen = _task(3, seed=5)
    (logits,) = _session(out / "model.onnx").run(None, {name: unseen[name] for name in NAMES})
    assert logits.shape == (3, 4)


BAD = [  # case, error code, words the message names
    ("missing", "missing_input", ["requires features", "found: image", "expected: image, features"]),
    ("extra", "unexpected_input", ["no input named mask", "found: image, features, mask"]),
]


@pytest.mark.parametrize(("case", "code", "words"), BAD, ids=[case for case, _, _ in BAD])
def test_arrays_that_do_not_match_the_onnx_inputs_are_refused(upload, tmp_path, capsys, case, code, words):
    model, _ = upload
    arrays = _task(32, seed=3)
    if case == "missing":
        del arrays["features"]
    else:
        arrays["mask"] = np.ones((32, 6), np.float32)
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    with pytest.raises(UserError) as info:
        inspect_files(model, data, None, FAST, IntakeOptions())
    assert info.value.code == code, str(info.value)
    for word in words:
        assert word in str(info.value)

    out = tmp_path / "result"
    exit_code = cli.main(["prune", str(model), "--data", str(data), "--out", str(out), "--params-reduction", "0.3"])
    err = capsys.readouterr().err
    assert exit_code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and words[0] in err
    assert not out.exists() or not any(out.iterdir())


def test_a_float_input_with_a_dynamic_second_axis_needs_the_data(tmp_path):
    """No size can be chosen for it (a sequence length is only assumed for integer ids and masks)."""
    path = tmp_path / "series.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(6, 2), (torch.randn(1, 5, 6),), str(path), dynamo=False, opset_version=17,
                          input_names=["series"], output_names=["logits"],
                          dynamic_axes={"series": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}})
    with pytest.raises(UserError) as info:
        inspect_files(path, None, None, FAST, IntakeOptions())
    assert info.value.code == "data_required"
