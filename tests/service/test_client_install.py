"""The must-show of idap-client: installed with `pip install ./client` into a fresh virtual environment
(no torch there), its `idap-client submit --wait --download` drives a real `idap serve`: a job that
succeeds (exit 0, an ONNX model that runs) and one that fails (exit 1, its error on stderr)."""

from __future__ import annotations

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

from tests.service.helpers import FAST, ROOT, start_serve, wait_ready


def fresh_venv(where: Path) -> Path:
    """A venv from the system's python3 with ./client installed (pip's own cache and indexes); its bin/."""
    subprocess.run(["python3", "-m", "venv", str(where)], check=True)
    subprocess.run([str(where / "bin" / "pip"), "install", "-q", str(ROOT / "client")], check=True,
                   env=client_env(), capture_output=True)
    return where / "bin"


def client_env() -> dict[str, str]:
    """This environment without the checkout on the path, without a venv, and without IDAP_* settings."""
    return {name: value for name, value in os.environ.items()
            if name not in ("PYTHONPATH", "VIRTUAL_ENV") and not name.startswith("IDAP_")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refused job asks for CUDA, which no worker here has")
def test_idap_client_from_a_fresh_venv_drives_idap_serve(digits: tuple[Path, Path], tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    serve, base = start_serve(tmp_path / "data", log)  # starts while the venv is made
    try:
        started = time.monotonic()
        bin_dir = fresh_venv(tmp_path / "venv")
        print(f"fresh venv with idap-client: {time.monotonic() - started:.1f} s", file=sys.stderr)
        no_torch = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
        subprocess.run([str(bin_dir / "python"), "-c", no_torch], check=True, env=client_env())
        wait_ready(serve, base, log)

        config = tmp_path / "fast.json"
        config.write_text(json.dumps(FAST))
        submit = [str(bin_dir / "idap-client"), "submit", str(digits[0]), "--data", str(digits[1]),
                  "--architecture", "idap:digits", "--macs-reduction", "0.3", "--server", base, "--wait"]
        done = subprocess.run(submit + ["--config", str(config), "--download", str(tmp_path / "out")],
                              env=client_env(), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr + log.read_text()[-3000:]
        assert "MACs" in done.stdout and "succeeded" in done.stderr
        with np.load(digits[1]) as data:
            x = data["x"][:4].astype(np.float32)
        session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (4, 10)

        # a job that cannot run here is refused at submit: exit 2, the server's reason on stderr
        config.write_text(json.dumps(FAST | {"device": "cuda"}))
        refused = subprocess.run(submit + ["--config", str(config)], env=client_env(), capture_output=True, text=True,
                                 timeout=180)
        assert refused.returncode == 2 and "device_unavailable" in refused.stderr, refused.stdout + refused.stderr

        # a job that ends without succeeding (cancelled while the client waits): exit 1, said on stderr;
        # long enough that the cancel always lands before it could finish
        long = {"recovery": {"recovery_iterations": 5000, "final_recovery_iterations": 5000}}
        config.write_text(json.dumps(FAST | long))
        waiting = subprocess.Popen(submit + ["--config", str(config)], env=client_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert waiting.stdout is not None
        job_id = waiting.stdout.readline().strip()
        subprocess.run([str(bin_dir / "idap-client"), "cancel", job_id, "--server", base], env=client_env(),
                       check=True, capture_output=True, timeout=60)
        _, stderr = waiting.communicate(timeout=180)
        assert waiting.returncode == 1, stderr
        assert f"error: job {job_id} cancelled" in stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
