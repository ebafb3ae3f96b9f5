"""Arrays in an .npz file (one per model input, or a single unnamed x, and optional y) as a checked dataset.

An .npz is a zip, and `np.load` inflates whatever its members hold: a 9 MB file of zeros can
declare a 2 GiB array. Here nothing is inflated past the limits: the members' declared sizes
together must fit `max_unpacked_bytes` (checked from the zip's directory, as for any zip), each
array's header (shape and dtype) must fit its member and `max_samples` before its data is read,
and the bytes read are counted against the member's declared size while reading.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import cast

import numpy as np
import torch

from core.data import Dataset
from core.errors import DataError, InputFileError
from core.inputs import Inputs
from core.intake.archives import ZipLimits, safe_members
from core.options import IntakeOptions

# the arrays holding labels; every other array is an input, named after the model's forward parameter
LABEL_NAMES = ("y", "labels")
_CHUNK = 1 << 24
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_SAVE_HINT = "Save it with numpy.savez(path, x=inputs, y=labels)."
_LABELS_HINT = ("Store y with the samples on its first axis, in the task's layout (README, Tasks): class or group ids "
                "int64 (N,), masks int64 (N, H, W), boxes float32 (N, M, 5), targets float32 shaped like the output.")


def load_npz(path: str | Path, limits: IntakeOptions | None = None) -> Dataset:
    """Read the input arrays and optional labels (`y` or `labels`) from an .npz file and check them,
    within `limits` (sizes and sample count; default: `IntakeOptions()`'s)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"Data file not found: {path}.", hint="Pass an existing .npz file with --data.")
    arrays = read_arrays(path, limits or IntakeOptions())
    inputs = {name: array for name, array in arrays.items() if name not in LABEL_NAMES}
    if not inputs:
        raise DataError(
            f"{path} has no input arrays (found: {', '.join(sorted(arrays)) or 'none'}).",
            hint="Save inputs as x (or one array per model input, by name) and optional labels as y: "
                 "numpy.savez(path, x=..., y=...).",
        )
    return dataset_from_arrays(inputs, next((arrays[name] for name in LABEL_NAMES if name in arrays), None))


def read_arrays(path: Path, limits: IntakeOptions) -> dict[str, np.ndarray]:
    """The arrays of the .npz at `path` by name, never inflating more than the limits allow."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = safe_members(archive, ZipLimits(limits.max_zip_members, limits.max_unpacked_bytes))
            return {info.filename.removesuffix(".npy"): _read_member(archive, info, limits) for info in members}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputFileError(f"{path} is not a readable .npz file ({exc.__class__.__name__}).",
                             hint=_SAVE_HINT) from exc


class _Counted:
    """A member's stream that refuses to yield more than the member declared (zipfile stops there
    too; this does not rely on it)."""

    def __init__(self, stream: io.BufferedIOBase, name: str, declared: int) -> None:
        self.stream, self.name, self.left = stream, name, declared

    def _count(self, got: int) -> None:
        self.left -= got
        if self.left < 0:
            raise InputFileError(f"The array {self.name} inflates to more than its declared size.",
                                 hint="Save the data again with numpy.savez.", code="zip_bomb")

    def read(self, size: int = -1, /) -> bytes:
        data = self.stream.read(size)
        self._count(len(data))
        return data

    def readinto(self, buffer: memoryview) -> int:
        got = self.stream.readinto(buffer)
        self._count(got)
        return got


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IntakeOptions) -> np.ndarray:
    name = info.filename.removesuffix(".npy")
    with archive.open(info) as raw:
        stream = _Counted(cast(io.BufferedIOBase, raw), name, info.file_size)  # a ZipExtFile
        version = np.lib.format.read_magic(stream)
        if version not in _HEADER_READERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran_order, dtype = _HEADER_READERS[version](stream)
        if dtype.hasobject:
            raise DataError(f"{name} holds Python objects (dtype {dtype}); only numeric arrays are read.",
                            hint="Store features as float32, token ids and masks as int64.")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes > info.file_size:
            raise InputFileError(f"The array {name} declares {nbytes} bytes, more than its zip member holds "
                                 f"({info.file_size}).", hint=_SAVE_HINT, code="zip_bomb")
        if shape and shape[0] > limits.max_samples:
            raise too_many_samples(shape[0], limits.max_samples)
        array = np.empty(count, dtype=dtype)
        _fill(stream, memoryview(array.view(np.uint8).data) if nbytes else memoryview(b""))
    if fortran_order:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def _fill(stream: _Counted, buffer: memoryview) -> None:
    done = 0
    while done < len(buffer):
        got = stream.readinto(buffer[done:done + _CHUNK])
        if not got:
            raise EOFError("the array's data ends early")
        done += got


def too_many_samples(samples: int, limit: int) -> DataError:
    return DataError(f"The data holds {samples} samples; at most {limit} are accepted.",
                     hint="Upload a random subset.", code="too_many_samples")


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
    """The labels as int64 or float32, samples on the first axis. Their layout is the task's to check
    (core.tasks: class ids, group ids, masks, boxes, targets); here only what no task accepts is refused."""
    if y is None:
        return None
    if y.dtype.kind not in "iubf":
        raise DataError(f"y must be numeric, got dtype {y.dtype}.", hint=_LABELS_HINT, code="labels_wrong_format")
    if y.ndim == 0 or y.shape[0] != n:
        raise DataError(f"y must hold one label per sample, {n} on its first axis to match the inputs; got shape "
                        f"{y.shape}.", hint=_LABELS_HINT, code="labels_wrong_format")
    if y.dtype.kind != "f":
        return torch.from_numpy(y.astype(np.int64))
    y = y.astype(np.float32, copy=False)
    if not np.isfinite(y).all():
        raise DataError(f"y contains {int((~np.isfinite(y)).sum())} NaN or Inf value(s).",
                        hint="Clean or drop those samples.", code="labels_wrong_format")
    return torch.from_numpy(np.ascontiguousarray(y))
