"""Intake: every model and data format reaches the engine, and every bad input gets its own code."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from safetensors.torch import save_file, save_model

from core.errors import UserError
from core.intake.files import compress_files, inspect_files, open_data
from core.intake.model_io import open_model
from core.intake.npz import load_npz
from core.options import CompressOptions, IntakeOptions, Target
from core.report import NotPrunableRow, Report
from tests.intake_fixtures import write_bert_zip, write_image_zip, write_review_jsonl

FAST = CompressOptions(recovery_iterations=2, final_recovery_iterations=2, latency_runs=1, batch_size=16,
                       max_steps=6, seed=0)
SERVICE = IntakeOptions()  # what an upload gets: no pickles


@pytest.fixture(scope="module")
def bert_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert_zip(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
    torch.manual_seed(0)
    save_model(torchvision.models.resnet18(num_classes=3), path)
    return path


def write_digits_like_weights(directory: Path) -> Path:
    from core.examples import DigitsNet

    path = directory / "digits.safetensors"
    save_model(DigitsNet(), path)
    return path


def _raises(code: str, fragment: str, call, *args, **kwargs) -> UserError:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    assert info.value.code == code, (info.value.code, str(info.value))
    assert fragment in str(info.value)
    return info.value


def _ort_outputs(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_safetensors_with_torchvision_architecture_and_image_folder(resnet_weights, tmp_path, monkeypatch):
    images = write_image_zip(tmp_path / "pets.zip", side=40)
    intake = IntakeOptions(architecture="torchvision:resnet18(num_classes=3)", image_size=32)
    preflight = inspect_files(resnet_weights, images, Target(macs_reduction=0.5), FAST, intake)
    assert preflight.input_shape == [3, 32, 32] and preflight.samples == 24 and preflight.feasible
    assert NotPrunableRow(name="fc", type="Linear", reason="output layer (its outputs are classes)") in \
        preflight.not_prunable
    assert [b.name for b in preflight.blocks][:2] == ["layer1.0", "layer1.1"]
    writes = []
    write = Report.write
    monkeypatch.setattr(Report, "write", lambda report, path: (writes.append(path), write(report, path)))
    result = compress_files(resnet_weights, images, Target(macs_reduction=0.5, max_accuracy_drop=1.0),
                            FAST, intake, tmp_path / "out")
    report = result.report
    assert report.input_format == "safetensors"
    assert report.macs_reduction == pytest.approx(0.5, abs=0.03)
    # written once, complete: with what intake knows about the upload
    assert writes == [tmp_path / "out" / "report.json"] == [result.artifacts["report.json"]]
    assert Report.model_validate_json(writes[0].read_text()) == report
    (logits,) = _ort_outputs(tmp_path / "out" / "model.onnx", {"input": np.random.rand(3, 3, 32, 32).astype("f4")})
    assert logits.shape == (3, 3)


def test_image_folder_reads_classes_in_name_order_resized_and_normalised(tmp_path):
    images = write_image_zip(tmp_path / "pets.zip", classes=("zebra", "ant"), per_class=3, side=20, root="")
    loaded = open_model(write_digits_like_weights(tmp_path), IntakeOptions(architecture="idap:digits"))
    data = open_data(images, loaded, IntakeOptions(image_size=8, mean=(0.5,), std=(0.25,)))
    x = data.inputs.tensors["x"]
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32
    # ant sorts before zebra: classes are numbered in name order, like torchvision's ImageFolder
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(x.min()) >= -2.0 - 1e-6 and float(x.max()) <= 2.0 + 1e-6


def test_hf_bert_zip_with_jsonl_text_through_the_cli(bert_zip, tmp_path, capsys):
    from core.cli import main

    text = write_review_jsonl(tmp_path / "reviews.jsonl")
    assert main(["inspect", str(bert_zip), "--data", str(text), "--params-reduction", "0.3", "--json"]) == 0
    preflight = json.loads(capsys.readouterr().out)
    assert preflight["input_format"] == "hf" and preflight["feasible"] is True
    assert preflight["input_dtype"] == "int64" and preflight["num_classes"] == 2
    heads = {g["name"]: g["width"] for g in preflight["prunable_groups"] if g["name"].startswith("heads:")}
    assert heads == {f"heads:model.bert.encoder.layer.{i}.attention.self": 4 for i in range(2)}
    assert not [row for row in preflight["not_prunable"] if "attention.self" in row["name"]]

    out = tmp_path / "pruned"
    code = main(["prune", str(bert_zip), "--data", str(text), "--params-reduction", "0.3",
                 "--max-accuracy-drop", "1", "--recovery-iterations", "1", "--final-recovery-epochs", "0",
                 "--batch-size", "16", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    # 32-wide layers pruned in steps of 8 cannot land closer than this
    assert report["target_met"] and 0.27 <= report["params_reduction"] <= 0.4
    # the export keeps the text interface: every int64 array the tokenizer makes, with dynamic batch and
    # sequence axes
    for shape in ((1, 7), (3, 12)):
        ids = np.random.default_rng(0).integers(5, 20, size=shape).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        (logits,) = _ort_outputs(out / "model.onnx", feed)
        assert logits.shape == (shape[0], 2)


def test_pickle_is_refused_unless_allowed(digits_files):
    error = _raises("pickle_not_allowed", "run code from the upload", open_model, digits_files[0], SERVICE)
    assert "IDAP_ALLOW_PICKLE" in error.hint
    assert open_model(digits_files[0], IntakeOptions(allow_pickle=True)).format == "pickle"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_is_refused_even_when_pickles_are_allowed(digits_model, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(digits_model, torch.rand(1, 1, 8, 8)), path)
    _raises("pickle_not_allowed", "TorchScript", open_model, path, SERVICE)
    _raises("torchscript_not_supported", "TorchScript", open_model, path, IntakeOptions(allow_pickle=True))


@pytest.mark.parametrize(
    ("content", "code", "fragment"),
    [
        (b"", "empty_file", "is empty"),
        (bytes(np.random.default_rng(1).integers(0x10, 0x7F, 4096, dtype=np.uint8)), "unknown_model_format",
         "not a model file"),
    ],
)
def test_empty_and_random_model_files(tmp_path, content, code, fragment):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    _raises(code, fragment, open_model, path, SERVICE)


def test_safetensors_keys_that_do_not_fit_the_architecture_are_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"features.0.weight": torch.zeros(4, 3, 3, 3), "classifier.bias": torch.zeros(10)}, path)
    error = _raises("weights_mismatch", "missing keys", open_model, path,
                    IntakeOptions(architecture="torchvision:resnet18"))
    assert "unexpected keys classifier.bias, features.0.weight" in error.message


def test_weights_trained_with_other_arguments(resnet_weights):
    _raises("weights_mismatch", "size mismatch for fc.weight", open_model, resnet_weights,
            IntakeOptions(architecture="torchvision:resnet18"))


@pytest.mark.parametrize(
    ("architecture", "code", "fragment"),
    [
        ("torchvision:resnet19", "unknown_architecture", "Unknown torchvision architecture 'resnet19'"),
        ("timm:resnet18", "unknown_architecture", "must start with"),
        ("torchvision:resnet18(num_classes=__import__('os'))", "invalid_architecture", "must be literals"),
        ("torchvision:resnet18(colour=3)", "invalid_architecture", "cannot be built"),
        (None, "architecture_required", "holds weights only"),
    ],
)
def test_bad_architecture_references(resnet_weights, architecture, code, fragment):
    _raises(code, fragment, open_model, resnet_weights, IntakeOptions(architecture=architecture))


def test_unknown_architecture_suggests_close_names(resnet_weights):
    error = _raises("unknown_architecture", "resnet19", open_model, resnet_weights,
                    IntakeOptions(architecture="torchvision:resnet19"))
    assert "resnet18" in error.hint


def test_zip_bomb_is_refused_before_unpacking(bert_zip, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bert/config.json", "{}")
        archive.writestr("bert/model.safetensors", b"\0" * (20 << 20))
    assert bomb.stat().st_size < 100_000
    _raises("zip_bomb", "unpacks to", open_model, bomb, IntakeOptions(max_unpacked_bytes=10 << 20))


def test_too_many_members(tmp_path):
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(30):
            archive.writestr(f"cls{i % 2}/{i}.png", b"x")
    loaded = open_model(write_digits_like_weights(tmp_path), IntakeOptions(architecture="idap:digits"))
    _raises("zip_too_many_members", "30 members", open_data, path, loaded, IntakeOptions(max_zip_members=10))


@pytest.mark.parametrize("member", ["../evil/config.json", "/etc/config.json", "a/../../config.json"])
def test_zip_slip_member_is_refused(tmp_path, member):
    path = tmp_path / "slip.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bert/config.json", "{}")
        archive.writestr(member, "{}")
    _raises("zip_slip", "points outside the archive", open_model, path, SERVICE)
    assert not (tmp_path.parent / "evil").exists()


@pytest.fixture
def digits_loaded(digits_files):
    return open_model(digits_files[0].with_suffix(".safetensors"), IntakeOptions(architecture="idap:digits"))


def test_image_folder_with_one_class(tmp_path, digits_loaded):
    path = write_image_zip(tmp_path / "one.zip", classes=("only",))
    _raises("too_few_classes", "1 class folder(s) (only)", open_data, path, digits_loaded, SERVICE)


def test_unreadable_image_is_named(tmp_path, digits_loaded):
    path = write_image_zip(tmp_path / "bad.zip", classes=("a", "b"), per_class=2)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("pets/b/broken.png", b"not a png")
    _raises("unreadable_image", "pets/b/broken.png cannot be read", open_data, path, digits_loaded, SERVICE)


def test_data_shape_the_model_rejects(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.rand(8, 3, 5).astype("f4"), y=np.zeros(8, dtype=np.int64))
    _raises("data_shape_mismatch", "rejects inputs of shape (3, 5)", inspect_files, write_digits_like_weights(tmp_path),
            path, None, CompressOptions(), IntakeOptions(architecture="idap:digits"))


def test_labels_outside_the_model_classes(tmp_path, digits_arrays):
    x, _ = digits_arrays
    path = tmp_path / "data.npz"
    np.savez(path, x=x[:40], y=np.full(40, 12, dtype=np.int64))
    _raises("labels_out_of_range", "but the model has 10 classes", inspect_files,
            write_digits_like_weights(tmp_path), path, None, CompressOptions(),
            IntakeOptions(architecture="idap:digits"))


def test_text_without_a_text_column(bert_zip, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,label\ngood film,1\nbad plot,0\n")
    loaded = open_model(bert_zip, SERVICE)
    _raises("missing_text_column", "no 'text' column (found: label, review)", open_data, path, loaded, SERVICE)
    data = open_data(path, loaded, IntakeOptions(text_column="review"))
    assert data.inputs.tensors["input_ids"].dtype == torch.int64 and data.y.tolist() == [1, 0]


def test_text_labels_by_name_and_unknown_names(bert_zip, tmp_path):
    loaded = open_model(bert_zip, SERVICE)
    path = tmp_path / "named.jsonl"
    path.write_text('{"text": "good", "label": "class1"}\n{"text": "bad", "label": "class0"}\n')
    assert open_data(path, loaded, SERVICE).y.tolist() == [1, 0]
    path.write_text('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "class0"}\n')
    _raises("invalid_labels", "label 'positive'", open_data, path, loaded, SERVICE)


def test_text_labels_as_float_targets(bert_zip, tmp_path):
    loaded = open_model(bert_zip, SERVICE)
    path = tmp_path / "scores.jsonl"
    path.write_text('{"text": "good", "label": 0.75}\n{"text": "bad", "label": 2}\n')
    y = open_data(path, loaded, SERVICE).y
    assert y.dtype == torch.float32 and y.tolist() == [0.75, 2.0]
    path.write_text('{"text": "good", "label": [0.5, 1]}\n{"text": "bad", "label": [-1, 0.25]}\n')
    y = open_data(path, loaded, SERVICE).y
    assert y.dtype == torch.float32 and y.tolist() == [[0.5, 1.0], [-1.0, 0.25]]
    csv = tmp_path / "scores.csv"
    csv.write_text("text,label\ngood film,0.9\nbad plot,-0.1\n")
    assert open_data(csv, loaded, SERVICE).y.tolist() == pytest.approx([0.9, -0.1])
    path.write_text('{"text": "good", "label": [0.5, 1]}\n{"text": "bad", "label": [1]}\n')
    _raises("invalid_labels", "different lengths (1 to 2)", open_data, path, loaded, SERVICE)
    path.write_text('{"text": "good", "label": "NaN"}\n{"text": "bad", "label": 1}\n')
    _raises("invalid_labels", "NaN or Inf", open_data, path, loaded, SERVICE)


def test_text_data_needs_a_model_with_a_tokenizer(tmp_path, digits_loaded):
    path = write_review_jsonl(tmp_path / "reviews.jsonl")
    _raises("unknown_data_format", "needs a model that ships a tokenizer", open_data, path, digits_loaded, SERVICE)


def test_hf_directory_without_safetensors_weights(tmp_path):
    path = tmp_path / "bin.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/config.json", json.dumps({"model_type": "bert", "architectures":
                                                      ["BertForSequenceClassification"]}))
        archive.writestr("m/pytorch_model.bin", b"\x80\x02pickle")
    _raises("hf_weights_missing", "no model.safetensors", open_model, path, SERVICE)


def test_hf_architecture_outside_the_built_in_classifiers(tmp_path):
    path = tmp_path / "remote.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/config.json", json.dumps({"model_type": "bert", "architectures": ["MyEvilModel"],
                                                      "auto_map": {"AutoModel": "evil.MyEvilModel"}}))
    _raises("unsupported_hf_architecture", "MyEvilModel", open_model, path, SERVICE)


def test_too_many_samples(tmp_path, digits_files, digits_loaded):
    _raises("too_many_samples", "at most 100", open_data, digits_files[1], digits_loaded,
            IntakeOptions(max_samples=100))


def test_file_over_the_size_limit(digits_files):
    _raises("file_too_large", "at most", open_model, digits_files[0].with_suffix(".safetensors"),
            IntakeOptions(architecture="idap:digits", max_file_bytes=1000))


def test_onnx_upload_through_the_cli_keeps_its_interface(tmp_path, capsys):
    from core.cli import main

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    onnx_path = tmp_path / "mobilenet.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["pixel_values"], output_names=["scores"],
                      dynamic_axes={"pixel_values": {0: "n"}, "scores": {0: "n"}})
    images = write_image_zip(tmp_path / "pets.zip", side=48)

    assert main(["inspect", str(onnx_path), "--data", str(images), "--macs-reduction", "0.5", "--json"]) == 0
    preflight = json.loads(capsys.readouterr().out)
    assert preflight["input_format"] == "onnx" and preflight["input_shape"] == [3, 32, 32]
    assert preflight["feasible"] is True and preflight["prunable_groups"]
    # the inverted residual blocks, found in the flat converted graph
    assert preflight["blocks"] and {b["kind"] for b in preflight["blocks"]} == {"identity"}

    out = tmp_path / "pruned"
    assert main(["prune", str(onnx_path), "--data", str(images), "--macs-reduction", "0.5", "--max-accuracy-drop",
                 "1", "--recovery-iterations", "1", "--final-recovery-epochs", "0", "--batch-size", "8",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["macs_reduction"] == pytest.approx(0.5, abs=0.03)
    # Stage 2 finds the inverted residual blocks in the converted graph
    assert any(step["stage"] == "layers" for step in report["steps"]), report["steps"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["scores"]
    (scores,) = session.run(None, {"pixel_values": np.random.rand(5, 3, 32, 32).astype("f4")})
    assert scores.shape == (5, 3)


def _npz_declaring(path: Path, shape: tuple[int, ...], data_bytes: int) -> Path:
    """An .npz whose x declares `shape` (float32 zeros) and holds `data_bytes` of them, deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
            member.write(bytes(data_bytes))
    return path


def test_an_npz_is_refused_from_its_header_and_directory_before_anything_is_inflated(tmp_path):
    import tracemalloc


    bomb = _npz_declaring(tmp_path / "bomb.npz", (1 << 15, 512), 64 << 20)  # 64 MiB of zeros in ~64 kB
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        _raises("too_many_samples", "32768 samples; at most 1000", load_npz, bomb, IntakeOptions(max_samples=1000))
        _raises("zip_bomb", "unpacks to 67 MB", load_npz, bomb, IntakeOptions(max_unpacked_bytes=32 << 20))
        # the header claims more than the member holds: refused before allocating what it claims
        liar = _npz_declaring(tmp_path / "liar.npz", (1 << 20, 512), 1 << 20)
        _raises("zip_bomb", "declares 2147483648 bytes", load_npz, liar)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    # within the limits the same file is read, as np.load reads it
    assert load_npz(bomb, IntakeOptions(max_samples=1 << 15)).inputs.tensors["x"].shape == (1 << 15, 512)


def test_npz_arrays_read_as_np_load_reads_them(tmp_path):
    from core.intake.npz import read_arrays

    path = tmp_path / "data.npz"
    arrays = {"x": np.random.rand(6, 3, 4).astype("f4"), "ids": np.arange(12, dtype=np.int64).reshape(6, 2),
              "f": np.asfortranarray(np.random.rand(6, 5)), "y": np.arange(6)}
    np.savez_compressed(path, **arrays)
    read = read_arrays(path, IntakeOptions())
    assert set(read) == set(arrays)
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array), name


@pytest.mark.parametrize(("y", "dtype"), [
    (np.array([0, 3, 3, 7, 1, 0]), torch.int64),  # class or group ids
    (np.random.default_rng(0).integers(0, 3, (6, 4, 5)).astype(np.uint8), torch.int64),  # segmentation masks
    (np.full((6, 2, 5), -1.0), torch.float32),  # detection boxes, padded with class -1
    (np.random.default_rng(0).random((6, 3)), torch.float32),  # generic targets
    (np.array([True, False] * 3), torch.int64),  # a binary label
])
def test_npz_labels_are_read_in_every_tasks_layout(tmp_path, y, dtype):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.rand(6, 3).astype("f4"), y=y)
    labels = load_npz(path).y
    assert labels.dtype == dtype and labels.shape == y.shape
    assert np.array_equal(labels.numpy(), y.astype(labels.numpy().dtype))


@pytest.mark.parametrize(("y", "fragment"), [
    (np.array(["cat"] * 6), "y must be numeric, got dtype <U3"),
    (np.zeros(5, dtype=np.int64), "6 on its first axis to match the inputs; got shape (5,)"),
    (np.array(3), "got shape ()"),
    (np.array([0.5, np.nan, 1, 2, 3, 4]), "y contains 1 NaN or Inf"),
])
def test_npz_labels_no_task_reads_are_refused(tmp_path, y, fragment):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.rand(6, 3).astype("f4"), y=y)
    _raises("labels_wrong_format", fragment, load_npz, path)


@pytest.mark.parametrize(("task", "y", "code", "fragment"), [
    ("auto", np.random.default_rng(0).random(40), "labels_wrong_format",
     "Classification labels are one integer class id per sample; got torch.float32"),
    ("embedding", np.arange(40), "labels_wrong_format", "Every embedding label is different"),
    ("generic", np.zeros(40, dtype=np.int64), "labels_wrong_format", "10 floats per sample"),
    ("segmentation", np.zeros(40, dtype=np.int64), "output_not_map", "per-pixel map"),
    ("detection", None, "output_not_detections", "not detections"),
])
def test_labels_or_outputs_that_do_not_fit_the_task(tmp_path, digits_arrays, task, y, code, fragment):
    from core.tasks.kinds import Task

    path = tmp_path / "data.npz"
    np.savez(path, x=digits_arrays[0][:40], **({} if y is None else {"y": y}))
    _raises(code, fragment, inspect_files, write_digits_like_weights(tmp_path), path, None,
            CompressOptions(task=Task(task)), IntakeOptions(architecture="idap:digits"))


def test_images_at_the_top_of_a_zip_are_data_without_labels(tmp_path, digits_loaded):
    path = tmp_path / "flat.zip"
    with zipfile.ZipFile(write_image_zip(tmp_path / "pets.zip", classes=("a", "b"), per_class=3)) as source, \
            zipfile.ZipFile(path, "w") as flat:
        for info in source.infolist():
            flat.writestr(info.filename.replace("/", "_"), source.read(info))
    data = open_data(path, digits_loaded, SERVICE)
    assert data.y is None and tuple(data.inputs.first.shape) == (6, 1, 8, 8)


def test_a_zipped_hf_directory_is_checked_before_it_is_unpacked(tmp_path, monkeypatch):
    import core.intake.model_io as model_io

    def no_unpacking(*_args, **_kwargs):
        raise AssertionError("unpacked before its config.json was checked")

    monkeypatch.setattr(model_io, "extract", no_unpacking)
    cases = {
        "unsupported_hf_architecture": {"model_type": "bert", "architectures": ["MyEvilModel"]},
        "invalid_hf_model": "{not json",
        "hf_weights_missing": {"model_type": "bert", "architectures": ["BertForSequenceClassification"]},
    }
    for code, config in cases.items():
        path = tmp_path / f"{code}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("m/config.json", config if isinstance(config, str) else json.dumps(config))
            archive.writestr("m/pytorch_model.bin", b"\0" * (8 << 20))
        _raises(code, "", open_model, path, SERVICE)
    big_config = tmp_path / "big.zip"
    with zipfile.ZipFile(big_config, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/config.json", " " * (2 << 20))
    _raises("zip_bomb", "larger than 1048576 bytes", open_model, big_config, SERVICE)
