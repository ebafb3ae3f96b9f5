"""The `idap` CLI: exit codes, one-line errors, atomic output, and a real end-to-end run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from core import cli
from core.intake import files
from core.progress import ProgressEvent
from core.run.pipeline import Result
from tests.report_fixtures import sample_report

REPO = Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "macs_before", "macs_after", "params_before", "params_after", "accuracy_before", "accuracy_after",
    "latency_ms_before", "latency_ms_after", "onnx_max_abs_diff", "removed_blocks", "layers", "steps",
    "target_met", "stop_reason",
}
# Small recovery budgets keep a real run on the digits model to seconds.
FAST = ["--recovery-iterations", "5", "--final-recovery-epochs", "0"]


def run_main(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_process(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(code: int, err: str, out: Path, *words: str) -> None:
    """Exit 2, exactly one `error:` line (last on stderr) naming the problem, no traceback, no output."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    for word in words:
        assert word.lower() in lines[-1].lower(), lines[-1]
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.*")), "a staging directory was left behind"


def prune_args(model: object, data: object, out: Path, *extra: object) -> list[object]:
    return ["prune", model, "--data", data, "--out", out, *extra]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "result"


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# --- bad inputs: each one is a single line on stderr and exit code 2 --------------------------


def test_missing_model_file(capsys, digits_files, out, tmp_path):
    code, _, err = run_main(capsys, *prune_args(tmp_path / "nope.pt", digits_files[1], out,
                                                "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "not found", "nope.pt")


def test_garbage_model_file(capsys, digits_files, out, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = run_main(capsys, *prune_args(garbage, digits_files[1], out, "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "garbage.pt", "not a model file")
    assert "trust" not in err  # the warning is for pickles only, and this file is not one


def test_pickled_model_gets_a_trust_warning(capsys, digits_files, out):
    # an unknown layer name stops the run right after loading, which is where the warning comes
    code, _, err = run_main(capsys, *prune_args(*digits_files, out, "--macs-reduction", 0.5, "--ignore-layer", "x"))
    assert code == 2 and "runs the pickled code inside it; use only files you trust" in err


def test_state_dict_instead_of_model(capsys, digits_files, digits_model, out, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(digits_model.state_dict(), weights)
    code, _, err = run_main(capsys, *prune_args(weights, digits_files[1], out, "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "state dict", "torch.save(model, path)")


def test_missing_data_file(capsys, digits_files, out, tmp_path):
    code, _, err = run_main(capsys, *prune_args(digits_files[0], tmp_path / "nope.npz", out,
                                                "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "data file", "nope.npz", "not found")


def test_data_file_not_npz(capsys, digits_files, out, tmp_path):
    data = tmp_path / "data.npz"
    data.write_bytes(np.random.default_rng(1).bytes(4096))
    code, _, err = run_main(capsys, *prune_args(digits_files[0], data, out, "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "not a readable .npz")


def test_data_with_nan(capsys, digits_files, digits_arrays, out, tmp_path):
    x, y = digits_arrays
    x = x.copy()
    x[3, 0, 2, 2] = np.nan
    data = write_npz(tmp_path / "nan.npz", x=x, y=y)
    code, _, err = run_main(capsys, *prune_args(digits_files[0], data, out, "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "NaN")


def test_data_shape_rejected_by_model(capsys, digits_files, out, tmp_path):
    data = write_npz(tmp_path / "shape.npz", x=np.zeros((16, 3, 5, 5), np.float32), y=np.zeros(16, np.int64))
    code, _, err = run_main(capsys, *prune_args(digits_files[0], data, out, "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "rejects inputs of shape (3, 5, 5)")


def test_labels_outside_classes(capsys, digits_files, digits_arrays, out, tmp_path):
    x, y = digits_arrays
    y = y.copy()
    y[0] = 12
    data = write_npz(tmp_path / "labels.npz", x=x, y=y)
    code, _, err = run_main(capsys, *prune_args(digits_files[0], data, out, "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "12", "10 classes")


def test_unreachable_target(capsys, digits_files, out):
    code, _, err = run_main(capsys, *prune_args(*digits_files, out, "--macs-reduction", 0.99,
                                                "--stages", "filters", "--min-width-fraction", 0.5))
    assert_user_error(code, err, out, "out of reach")


def test_layers_unconditional_lets_stage_two_skip_the_width_comparison(tmp_path):
    base = ["prune", "model.pt", "--data", "d.npz", "--out", str(tmp_path / "o"), "--macs-reduction", "0.5"]
    _, options = cli._target_and_options(cli.build_parser().parse_args(base))
    assert options.layers_must_beat_width
    _, options = cli._target_and_options(cli.build_parser().parse_args([*base, "--layers-unconditional"]))
    assert not options.layers_must_beat_width


@pytest.mark.parametrize(("flag", "field", "value"),
                         [("--precision", "precision", "bf16"), ("--norm-statistics", "norm_statistics", "update")])
def test_recovery_choices_reach_the_options(tmp_path, flag, field, value):
    base = ["prune", "model.pt", "--data", "d.npz", "--out", str(tmp_path / "o"), "--macs-reduction", "0.5"]
    _, options = cli._target_and_options(cli.build_parser().parse_args(base))
    assert getattr(options, field) == "auto"
    _, options = cli._target_and_options(cli.build_parser().parse_args([*base, flag, value]))
    assert getattr(options, field) == value


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--macs-reduction", "0.5", "--recovery-epochs", "1", "--recovery-iterations", "10"],
         ["--recovery-epochs", "--recovery-iterations"]),
        (["--macs-reduction", "0.5", "--stages", "bogus"], ["bogus"]),
        (["--macs-reduction", "1.5"], ["macs_reduction", "1.5"]),
        (["--max-accuracy-drop", "0.02"], ["no size target"]),
        (["--macs-reduction", "half"], ["--macs-reduction", "half"]),
        (["--macs-reduction", "0.5", "--frobnicate"], ["--frobnicate"]),
        (["--macs-reduction", "0.5", "--device", "tpu"], ["tpu"]),
    ],
)
def test_bad_options_fail_before_loading_anything(capsys, out, tmp_path, options, words):
    # The model and data do not exist: option errors must come first, without touching them.
    args = prune_args(tmp_path / "nope.pt", tmp_path / "nope.npz", out, *options)
    code, _, err = run_main(capsys, *args)
    assert_user_error(code, err, out, *words)
    assert "not found" not in err


def test_no_command(capsys, tmp_path):
    code, _, err = run_main(capsys)
    assert_user_error(code, err, tmp_path / "unused", "required")


def test_non_empty_out_needs_force(capsys, digits_files, out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_main(capsys, *prune_args(*digits_files, out, "--macs-reduction", 0.5))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_never_deletes_the_inputs(capsys, monkeypatch, digits_files, tmp_path):
    monkeypatch.setattr(files, "prune_and_export", _exporting)
    # --out is the directory that holds model.pt and data.npz: replacing it would delete them.
    inputs = [tmp_path / path.name for path in digits_files]
    for source, copy in zip(digits_files, inputs):
        copy.write_bytes(source.read_bytes())
    code, _, err = run_main(capsys, *prune_args(*inputs, tmp_path, "--macs-reduction", 0.5, "--force"))
    assert code == 2 and "would delete" in err
    assert all(path.exists() for path in inputs)


def test_out_that_cannot_be_created(capsys, digits_files, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "result"
    code, _, err = run_main(capsys, *prune_args(*digits_files, out, "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "cannot write beside --out")


def test_factory_with_mismatched_weights(capsys, digits_files, digits_model, out, tmp_path):
    state = digits_model.state_dict()
    state.pop("fc.bias")
    weights = tmp_path / "w.safetensors"
    save_file(state, weights)
    code, _, err = run_main(capsys, *prune_args("core.examples:DigitsNet", digits_files[1], out,
                                                "--weights", weights, "--macs-reduction", 0.5))
    assert_user_error(code, err, out, "missing keys fc.bias")
    assert "trust" not in err  # a factory runs installed code, not a pickle


def test_garbage_model_in_a_real_process(digits_files, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(2).bytes(1024))
    out = tmp_path / "result"
    proc = run_process(*prune_args(garbage, digits_files[1], out, "--macs-reduction", 0.5))
    assert_user_error(proc.returncode, proc.stderr, out, "not a model file")
    assert proc.stdout == ""


# --- output handling around a stand-in engine -------------------------------------------------


def _exporting(model, data, target, options, out_dir, progress=None, should_cancel=None, onnx_spec=None,
               checkpoint=None, resume=None):
    """prune_and_export's stand-in: writes model.onnx and leaves report.json to intake, as the real one does."""
    (out_dir / "model.onnx").write_bytes(b"onnx")
    return Result(model=model, report=sample_report(), artifacts={"model.onnx": out_dir / "model.onnx"})


def test_force_replaces_previous_output(capsys, monkeypatch, digits_files, out):
    monkeypatch.setattr(files, "prune_and_export", _exporting)
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    code, stdout, err = run_main(capsys, *prune_args(*digits_files, out, "--macs-reduction", 0.5, "--force"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    assert not list(out.parent.glob(".result.*"))
    assert str(out / "model.onnx") in stdout and "2.000 M" in stdout


def test_interrupt_leaves_nothing(capsys, monkeypatch, digits_files, out):
    def interrupted(model, data, target, options, out_dir, progress=None, should_cancel=None, onnx_spec=None,
                    checkpoint=None, resume=None):
        (out_dir / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "prune_and_export", interrupted)
    code, _, err = run_main(capsys, *prune_args(*digits_files, out, "--macs-reduction", 0.5))
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("error: Interrupted")
    assert not out.exists() and not list(out.parent.glob(".result.*"))


def test_progress_bar_shows_stage_and_message(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with cli._ProgressBar() as bar:
        bar(ProgressEvent("filters", 2, 10, 0.5, "step 2"))
    assert "filters: step 2" in terminal.getvalue() and "50%" in terminal.getvalue()


# --- the real engine ---------------------------------------------------------------------------


def test_prune_end_to_end(digits_files, digits_arrays, tmp_path):
    out = tmp_path / "pruned"
    proc = run_process(*prune_args(*digits_files, out, "--macs-reduction", 0.3, "--max-accuracy-drop", 0.05,
                                   *FAST))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt2", "report.json"}
    assert "MACs" in proc.stdout and str(out / "model.onnx") in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["macs_after"] < report["macs_before"]
    assert set(report["latency_ms_after"]) == {"batch_1", "batch_32"}

    x, y = digits_arrays
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    # The report's accuracy is on a held-out split; over all samples it should be about the same.
    assert abs(float((onnx_logits.argmax(1) == y).mean()) - report["accuracy_after"]) < 0.05

    exported = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        torch_logits = exported(torch.from_numpy(x)).numpy()
    assert float((torch_logits.argmax(1) == onnx_logits.argmax(1)).mean()) > 0.99


def test_ctrl_c_during_a_real_run_leaves_nothing(digits_files, tmp_path):
    out = tmp_path / "pruned"
    args = prune_args(*digits_files, out, "--macs-reduction", 0.5)
    command = [sys.executable, "-m", "core", *map(str, args)]
    # Ctrl-C at its default, as a shell gives it: a child inherits an ignored SIGINT, and a test worker that
    # ran a Celery pool in-process before this test may have left it ignored (billiard's workers do)
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # The staging directory appears once the inputs are loaded, i.e. while compress runs.
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".pruned.partial-*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".pruned.*"))
