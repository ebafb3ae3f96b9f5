from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.examples import make_digits_example

# pytest-xdist already runs one worker per core; torch's own threads on top of that spin against
# each other and made CPU training tens of times slower. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Enough to be far above chance (the tests never check the example's own accuracy bar here).
FIXTURE_EPOCHS = 3


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model.pt, data.npz) of a DigitsNet trained briefly; shared by every test of a worker."""
    return make_digits_example(tmp_path_factory.mktemp("digits"), seed=0, epochs=FIXTURE_EPOCHS)


@pytest.fixture(scope="session")
def digits_arrays(digits_files: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    with np.load(digits_files[1]) as archive:
        return archive["x"], archive["y"]


@pytest.fixture
def digits_model(digits_files: tuple[Path, Path]) -> torch.nn.Module:
    """A fresh copy per test, so no test sees another's changes."""
    return torch.load(digits_files[0], weights_only=False).eval()
