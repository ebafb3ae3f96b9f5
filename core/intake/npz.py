"""Arrays in an .npz file (x and optional y, or tokenised text) as a checked dataset."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from core.data import Dataset
from core.errors import DataError, InputFileError


def load_npz(path: str | Path) -> Dataset:
    """Read `x` and optional `y` from an .npz file and check them."""
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
    if "x" not in arrays and "input_ids" in arrays:
        # token data (see core.intake.text_data): the attention mask is derived from padding by the model wrapper
        return dataset_from_arrays(arrays["input_ids"], arrays.get("labels", arrays.get("y")))
    if "x" not in arrays:
        raise DataError(
            f"{path} has no array named 'x' (found: {', '.join(sorted(arrays)) or 'none'}).",
            hint="Save inputs as x (and optional labels as y): numpy.savez(path, x=..., y=...).",
        )
    return dataset_from_arrays(arrays["x"], arrays.get("y"))


def dataset_from_arrays(x: np.ndarray, y: np.ndarray | None) -> Dataset:
    if x.dtype.kind not in "fiu":
        raise DataError(f"x must be numeric, got dtype {x.dtype}.", hint="Store x as float32.")
    if x.ndim < 2:
        raise DataError(f"x must be N×… with at least 2 dimensions, got shape {x.shape}.",
                        hint="Put samples on the first axis.")
    if x.shape[0] < 2:
        raise DataError(f"x holds {x.shape[0]} sample(s); at least 2 are needed.",
                        hint="Provide a few hundred samples for reliable scores.")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise DataError(f"x contains {bad} NaN or Inf value(s).", hint="Clean or drop those samples.")
    return Dataset(torch.from_numpy(np.ascontiguousarray(x)), _labels(y, x.shape[0]))


def _labels(y: np.ndarray | None, n: int) -> torch.Tensor | None:
    if y is None:
        return None
    if y.dtype.kind not in "iu":
        raise DataError(f"y must hold integer class ids, got dtype {y.dtype}.", hint="Store y as int64.")
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"y must have shape ({n},) to match x, got {y.shape}.",
                        hint="Give one label per sample in x.")
    if (y < 0).any():
        raise DataError("y contains negative class ids.", hint="Use class ids 0..num_classes-1.",
                        code="labels_out_of_range")
    return torch.from_numpy(y.astype(np.int64))
