"""Unpacking uploaded zips without trusting them: member paths, counts and sizes are checked
before anything is written, and the bytes written are counted again while extracting,
because the sizes a zip declares can lie."""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.errors import InputFileError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipLimits:
    max_members: int = 10_000
    max_unpacked_bytes: int = 4 << 30


def is_zip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def holds_only_arrays(names: list[str]) -> bool:
    """Whether zip member `names` are those of an .npz (numpy arrays only)."""
    return bool(names) and all(name.endswith(".npy") for name in names)


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputFileError(f"{path.name} is not a readable zip archive ({exc}).",
                             hint="Create it with `zip -r archive.zip folder/`.", code="invalid_zip") from exc


def safe_members(archive: zipfile.ZipFile, limits: ZipLimits) -> list[zipfile.ZipInfo]:
    """The regular-file members, after refusing unsafe paths, links and oversized archives."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise InputFileError(f"The zip holds {len(infos)} members; at most {limits.max_members} are accepted.",
                             hint="Upload fewer files, or ask the operator to raise the limit.",
                             code="zip_too_many_members")
    files = []
    for info in infos:
        _check_member_path(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputFileError(f"Zip member {info.filename!r} is a symbolic link.",
                                 hint="Zip the files themselves, not links.", code="zip_slip")
        if not info.is_dir():
            files.append(info)
    declared = sum(info.file_size for info in files)
    if declared > limits.max_unpacked_bytes:
        raise InputFileError(
            f"The zip unpacks to {declared / 1e6:.0f} MB; at most {limits.max_unpacked_bytes / 1e6:.0f} MB "
            "are accepted.", hint="Upload a smaller archive.", code="zip_bomb")
    return files


def _check_member_path(name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise InputFileError(f"Zip member {name!r} points outside the archive.",
                             hint="Zip with relative paths (no '..', no leading '/').", code="zip_slip")


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """A small member's bytes (a config file), refused when it declares or inflates to more than `max_bytes`."""
    refused = InputFileError(f"Zip member {info.filename!r} is larger than {max_bytes} bytes.",
                             hint="Upload the files the format needs, at their usual sizes.", code="zip_bomb")
    if info.file_size > max_bytes:
        raise refused
    try:
        with archive.open(info) as source:
            data = source.read(max_bytes + 1)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise InputFileError(f"Zip member {info.filename!r} cannot be read ({exc}).",
                             hint="Re-create the archive with a standard zip tool.", code="invalid_zip") from exc
    if len(data) > max_bytes:
        raise refused
    return data


def member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """Where a member unpacks, relative to the destination (zips made on Windows may use backslashes)."""
    return PurePosixPath(info.filename.replace("\\", "/"))


def extract(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, limits: ZipLimits) -> None:
    """Unpack `members` of `archive`, as `safe_members` returned them, into `dest`."""
    budget = limits.max_unpacked_bytes
    for info in members:
        target = dest / member_path(info)
        target.parent.mkdir(parents=True, exist_ok=True)
        budget = _copy_member(archive, info, target, budget, limits)


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int,
                 limits: ZipLimits) -> int:
    try:
        with archive.open(info) as source, target.open("wb") as sink:
            while chunk := source.read(_CHUNK):
                budget -= len(chunk)
                if budget < 0:
                    raise InputFileError(
                        f"The zip unpacks to more than {limits.max_unpacked_bytes / 1e6:.0f} MB "
                        "(its declared sizes are wrong).", hint="Upload a smaller, well-formed archive.",
                        code="zip_bomb")
                sink.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise InputFileError(f"Zip member {info.filename!r} cannot be read ({exc}).",
                             hint="Re-create the archive with a standard zip tool.", code="invalid_zip") from exc
    return budget
