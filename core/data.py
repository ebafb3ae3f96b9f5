"""Calibration data: loading, validation against the model, and the held-out split."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import DataError, InputFileError


@dataclass
class Dataset:
    """Inputs `x` (float32, N×…) and optional integer labels `y` (N)."""

    x: torch.Tensor
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labeled(self) -> bool:
        return self.y is not None

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.x[index], None if self.y is None else self.y[index])


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
        # token data (see core.text_data): the attention mask is derived from padding by the model wrapper
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


def split(data: Dataset, eval_fraction: float, seed: int, min_eval: int = 1) -> tuple[Dataset, Dataset]:
    """Deterministic split into (recovery, held-out evaluation)."""
    n = len(data)
    n_eval = min(max(int(round(n * eval_fraction)), min_eval), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_eval:]), data.subset(order[:n_eval])


@torch.no_grad()
def check_against_model(model: nn.Module, data: Dataset, device: torch.device) -> int:
    """Run one small batch; return the number of classes the model outputs."""
    from core.metrics import logits_of

    sample = data.x[: min(2, len(data))].to(device)
    try:
        out = logits_of(model(sample))
    except Exception as exc:  # the model decides what it accepts; any failure is the data's shape
        raise DataError(
            f"The model rejects inputs of shape {tuple(data.x.shape[1:])} (per sample): "
            f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "),
            hint="Store x with the shape the model was trained on, samples on the first axis.",
            code="data_shape_mismatch",
        ) from exc
    if out.ndim != 2:
        raise DataError(
            f"The model's output has shape {tuple(out.shape)}; a classifier output N×classes is needed.",
            hint="Compress a classification model, or wrap the model so it returns logits.",
        )
    num_classes = int(out.shape[1])
    if data.y is not None and int(data.y.max()) >= num_classes:
        raise DataError(
            f"Labels go up to {int(data.y.max())} but the model has {num_classes} classes.",
            hint=f"Use class ids 0..{num_classes - 1}, or drop y to compress without labels.",
            code="labels_out_of_range",
        )
    return num_classes
