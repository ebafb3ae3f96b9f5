"""Arrays in an .npz file (one per model input, or a single unnamed x, and optional y) as a checked dataset."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from core.data import Dataset
from core.errors import DataError, InputFileError
from core.inputs import Inputs

# the arrays holding labels; every other array is an input, named after the model's forward parameter
LABEL_NAMES = ("y", "labels")


def load_npz(path: str | Path) -> Dataset:
    """Read the input arrays and optional labels (`y` or `labels`) from an .npz file and check them."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"Data file not found: {path}.", hint="Pass an existing .npz file with --data.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputFileError(
            f"{path} is not a readable .npz file ({exc.__class__.__name__}).",
            hint="Save it with numpy.savez(path, x=inputs, y=labels).",
        ) from exc
    inputs = {name: array for name, array in arrays.items() if name not in LABEL_NAMES}
    if not inputs:
        raise DataError(
            f"{path} has no input arrays (found: {', '.join(sorted(arrays)) or 'none'}).",
            hint="Save inputs as x (or one array per model input, by name) and optional labels as y: "
                 "numpy.savez(path, x=..., y=...).",
        )
    return dataset_from_arrays(inputs, next((arrays[name] for name in LABEL_NAMES if name in arrays), None))


def dataset_from_arrays(arrays: dict[str, np.ndarray], y: np.ndarray | None) -> Dataset:
    """A dataset of the input arrays by name, in the dtypes they were saved in (floats as float32):
    token ids and masks stay integers."""
    tensors = {name: torch.from_numpy(np.ascontiguousarray(_checked(name, array))) for name, array in arrays.items()}
    inputs = Inputs(tensors)
    return Dataset(inputs, _labels(y, len(inputs)))


def _checked(name: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "fiub":
        raise DataError(f"{name} must be numeric, got dtype {x.dtype}.",
                        hint="Store features as float32, token ids and masks as int64.")
    if x.ndim < 2:
        raise DataError(f"{name} must be N×… with at least 2 dimensions, got shape {x.shape}.",
                        hint="Put samples on the first axis.")
    if x.shape[0] < 2:
        raise DataError(f"{name} holds {x.shape[0]} sample(s); at least 2 are needed.",
                        hint="Provide a few hundred samples for reliable scores.")
    if x.dtype.kind != "f":
        return x
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise DataError(f"{name} contains {bad} NaN or Inf value(s).", hint="Clean or drop those samples.")
    return x


def _labels(y: np.ndarray | None, n: int) -> torch.Tensor | None:
    if y is None:
        return None
    if y.dtype.kind not in "iu":
        raise DataError(f"y must hold integer class ids, got dtype {y.dtype}.", hint="Store y as int64.")
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"y must have shape ({n},) to match the inputs, got {y.shape}.",
                        hint="Give one label per sample.")
    if (y < 0).any():
        raise DataError("y contains negative class ids.", hint="Use class ids 0..num_classes-1.",
                        code="labels_out_of_range")
    return torch.from_numpy(y.astype(np.int64))
