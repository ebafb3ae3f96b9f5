"""Image-folder data: a zip of `class_name/*.png|jpg`, classes numbered in sorted name order
(torchvision's ImageFolder convention), or of images at its top level without labels (for tasks whose
labels are not a class per image: detection and segmentation are then measured against the original's
outputs); resized and normalised as the job config says."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.data import Dataset
from core.errors import DataError
from core.inputs import Inputs
from core.intake.archives import ZipLimits, open_zip, safe_members
from core.options import IntakeOptions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_LAYOUT_HINT = ("Zip one folder per class: cat/1.png, dog/2.jpg, ... (at least two classes), or put the images at the "
                "top of the zip for data without labels.")


def load_image_folder_zip(path: Path, intake: IntakeOptions, channels: int, side: int) -> Dataset:
    """Decode every image of the zip into an N×C×side×side float tensor, with class labels when the
    images are in class folders."""
    limits = ZipLimits(intake.max_zip_members, intake.max_unpacked_bytes)
    with open_zip(path) as archive:
        members = _image_members(archive, limits)
        labelled = members[0][0] is not None
        classes = sorted({label for label, _ in members if label is not None})
        if labelled and len(classes) < 2:
            raise DataError(f"The image zip has {len(classes)} class folder(s) ({', '.join(classes)}); "
                            "at least two are needed.", hint=_LAYOUT_HINT, code="too_few_classes")
        if len(members) < 2:
            raise DataError(f"The image zip holds {len(members)} image; at least 2 are needed.", hint=_LAYOUT_HINT,
                            code="too_few_samples")
        if len(members) > intake.max_samples:
            raise DataError(f"The image zip holds {len(members)} images; at most {intake.max_samples} are accepted.",
                            hint="Upload a random subset (a few thousand images are plenty for calibration).",
                            code="too_many_samples")
        # ZipExtFile never yields more than a member's declared size, which safe_members bounded.
        x = np.stack([_decode(archive, info, channels, side, intake) for _, info in members])
    y = torch.tensor([classes.index(label) for label, _ in members if label is not None], dtype=torch.int64) \
        if labelled else None
    return Dataset(Inputs.single(torch.from_numpy(x)), y)


def _image_members(archive: zipfile.ZipFile, limits: ZipLimits) -> list[tuple[str | None, zipfile.ZipInfo]]:
    """(class folder, member) per image in class folders; else (None, member) per image at the zip's top."""
    files = [info for info in safe_members(archive, limits) if not _hidden(info.filename)]
    parts = [PurePosixPath(info.filename).parts for info in files]
    # Zipping the dataset folder itself adds one common top directory above the class folders.
    depth = 1 if parts and all(len(p) >= 3 and p[0] == parts[0][0] for p in parts) else 0
    in_folders = [(info, p) for info, p in zip(files, parts) if len(p) == depth + 2]
    at_top = [(info, p) for info, p in zip(files, parts) if len(p) == 1]
    chosen = in_folders or at_top
    if not chosen:
        raise DataError("The zip has no images in class folders or at its top.", hint=_LAYOUT_HINT,
                        code="too_few_classes")
    members: list[tuple[str | None, zipfile.ZipInfo]] = []
    for info, p in chosen:
        if not p[-1].lower().endswith(IMAGE_SUFFIXES):
            raise DataError(f"{info.filename} is not an image ({', '.join(IMAGE_SUFFIXES)}).", hint=_LAYOUT_HINT,
                            code="unreadable_image")
        members.append((p[depth] if in_folders else None, info))
    return sorted(members, key=lambda m: m[1].filename)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


def _decode(archive: zipfile.ZipFile, info: zipfile.ZipInfo, channels: int, side: int,
            intake: IntakeOptions) -> np.ndarray:
    try:
        with archive.open(info) as handle, Image.open(handle) as opened:
            opened.load()
            image = opened.convert("L" if channels == 1 else "RGB").resize((side, side), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError, zipfile.BadZipFile, Image.DecompressionBombError) as exc:
        raise DataError(f"{info.filename} cannot be read as an image ({exc.__class__.__name__}).",
                        hint="Remove or re-save the file as PNG or JPEG.", code="unreadable_image") from exc
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    mean, std = _per_channel(intake.mean, channels), _per_channel(intake.std, channels)
    return (array - mean[:, None, None]) / std[:, None, None]


def _per_channel(values: tuple[float, ...], channels: int) -> np.ndarray:
    if len(values) == channels:
        return np.array(values, dtype=np.float32)
    # ImageNet statistics for a grayscale model: the mean over the colour channels.
    return np.full(channels, float(np.mean(values)), dtype=np.float32)
